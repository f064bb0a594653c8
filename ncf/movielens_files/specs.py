"""The MovieLens family as published: which datasets there are and how each one's files are laid out
(`DatasetSpec`, `DATASETS`), and the `DataError` every reader raises, naming the file and the line.

Where each dataset comes from and what it is checked against (archive URL, SHA-256 digests, published
sizes) is config: `data.datasets` in conf/data.yaml. This package holds how each one is read.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

FORMATS = ("ml-100k", "dat", "csv")
NO_GENRES = "(no genres listed)"
INT32_MAX = 2**31 - 1
INTEGER = re.compile(rb"-?[0-9]+")


class DataError(ValueError):
    """The data is missing, corrupt or violates the schema; the message says where."""


def _show(line: bytes | str) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return repr(text if len(text) <= 120 else text[:117] + "...")


def line_error(path: Path, line: int, problem: str, content: bytes | str | None = None) -> DataError:
    """A DataError naming the file, the line (1-based, header counted, as an editor shows it) and the problem."""
    shown = f": {_show(content)}" if content is not None else ""
    return DataError(f"{path}, line {line}: {problem}{shown}")


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    return path


@dataclass(frozen=True)
class DatasetSpec:
    """How one published dataset is read: its format, files, text encoding, rating scale and folds.

    Where it is downloaded from and what it is verified against (SHA-256 digests, published sizes)
    is config (`data.datasets.<name>` in conf/data.yaml), so it lives there, once.
    """

    name: str
    archive_folder: str  # the folder the archive extracts to
    format: str  # one of FORMATS
    ratings_file: str
    movies_file: str
    encoding: str  # of the movies file (titles); ratings are ASCII
    half_stars: bool  # ratings 0.5, 1.0, ..., 5.0; else whole stars 1-5
    genres_file: str | None = None  # ml-100k: u.genre, the order of the genre flags in u.item
    folds: tuple[str, ...] = ()  # ml-100k: predefined <name>.base / <name>.test splits

    def as_dict(self) -> dict:
        return asdict(self)

    def files(self, fold: str | None = None) -> list[str]:
        """The files the reader parses: ratings, movies, the genre list (ml-100k), and a fold's two files."""
        names = [self.ratings_file, self.movies_file, *([self.genres_file] if self.genres_file else [])]
        return names + ([f"{fold}.base", f"{fold}.test"] if fold else [])


def _spec(name: str, fmt: str, *, folder: str | None = None, **kwargs) -> DatasetSpec:
    files = {"ml-100k": ("u.data", "u.item"), "dat": ("ratings.dat", "movies.dat"),
             "csv": ("ratings.csv", "movies.csv")}[fmt]
    kwargs.setdefault("encoding", "utf-8")
    kwargs.setdefault("half_stars", True)
    return DatasetSpec(name=name, archive_folder=folder or name, format=fmt, ratings_file=files[0],
                       movies_file=files[1], **kwargs)


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    _spec("ml-latest-small", "csv"),
    _spec("ml-100k", "ml-100k", encoding="latin-1", half_stars=False, genres_file="u.genre",
          folds=("u1", "u2", "u3", "u4", "u5", "ua", "ub")),
    _spec("ml-1m", "dat", encoding="latin-1", half_stars=False),
    _spec("ml-10m", "dat", folder="ml-10M100K"),
    _spec("ml-20m", "csv"),
    _spec("ml-25m", "csv"),
    _spec("ml-32m", "csv"),
    _spec("ml-latest", "csv"),
)}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown MovieLens dataset '{name}'; known: {', '.join(DATASETS)}") from None
