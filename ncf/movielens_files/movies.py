"""The typed, validated reader of each published movies format (ml-100k `u.item` with `u.genre`,
`movies.dat`, `movies.csv`): movieId int32, title str, genres str ('|'-joined, "(no genres listed)" when
none)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from ncf.movielens_files.specs import (
    INT32_MAX,
    INTEGER,
    NO_GENRES,
    DataError,
    get_spec,
    line_error,
    require_file,
)


def _text_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without its ending); blank lines at the end of the file are dropped."""
    lines = require_file(path).read_bytes().split(b"\n")
    while lines and not lines[-1].strip(b"\r"):
        lines.pop()
    for number, raw in enumerate(lines, 1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            yield number, raw.decode(encoding)
        except UnicodeDecodeError as err:
            raise line_error(path, number, f"not valid {encoding} ({err.reason} at byte {err.start})", raw) from None


def _movie_id(path: Path, number: int, value: str, line: str) -> int:
    if not INTEGER.fullmatch(value.encode()) or not 1 <= int(value) <= INT32_MAX:
        raise line_error(path, number, f"non-integer movieId {value!r}", line)
    return int(value)


def _movies_frame(path: Path, rows: Iterator[tuple[int, int, str, str]]) -> pd.DataFrame:
    ids, titles, genres, seen = [], [], [], {}
    for number, movie_id, title, genre in rows:
        if movie_id in seen:
            raise line_error(path, number, f"duplicate movieId {movie_id}, already on line {seen[movie_id]}")
        seen[movie_id] = number
        ids.append(movie_id)
        titles.append(title)
        genres.append(genre or NO_GENRES)
    if not ids:
        raise DataError(f"{path} lists no movies")
    return pd.DataFrame({"movieId": np.array(ids, dtype=np.int32), "title": titles, "genres": genres})


def read_100k_genres(path: Path) -> list[str]:
    """ml-100k `u.genre`: `name|index` lines; the order of the 19 genre flags in u.item."""
    names = {}
    for number, line in _text_lines(path, "latin-1"):
        name, sep, index = line.partition("|")
        if not sep or not INTEGER.fullmatch(index.encode()) or not name:
            raise line_error(path, number, "expected 'name|index'", line)
        names[int(index)] = name
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: genre indices {sorted(names)} are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def read_100k_movies(path: Path, genres_path: Path | None = None) -> pd.DataFrame:
    """ml-100k `u.item`, latin-1: id | title | release date | video release date | IMDb URL | genre flags.

    The flags follow `u.genre` (next to u.item unless given). The flag "unknown" is not a genre:
    a movie with no other flag gets "(no genres listed)", as in the later datasets.
    """
    path = Path(path)
    names = read_100k_genres(Path(genres_path) if genres_path else path.with_name("u.genre"))

    def rows() -> Iterator[tuple[int, int, str, str]]:
        for number, line in _text_lines(path, "latin-1"):
            fields = line.split("|")
            if len(fields) != 5 + len(names):
                raise line_error(path, number, f"expected {5 + len(names)} fields separated by '|' "
                                          f"(5 + {len(names)} genre flags), found {len(fields)}", line)
            flags = fields[5:]
            if any(flag not in ("0", "1") for flag in flags):
                raise line_error(path, number, "genre flags must be 0 or 1", line)
            genre = "|".join(n for n, flag in zip(names, flags, strict=True) if flag == "1" and n != "unknown")
            yield number, _movie_id(path, number, fields[0], line), fields[1], genre

    return _movies_frame(path, rows())


def read_dat_movies(path: Path, encoding: str) -> pd.DataFrame:
    """ml-1m (latin-1) / ml-10m (utf-8) `movies.dat`: `MovieID::Title::Genres`."""
    path = Path(path)

    def rows() -> Iterator[tuple[int, int, str, str]]:
        for number, line in _text_lines(path, encoding):
            fields = line.split("::")
            if len(fields) != 3:
                raise line_error(path, number, f"expected 3 fields separated by '::', found {len(fields)}", line)
            yield number, _movie_id(path, number, fields[0], line), fields[1], fields[2]

    return _movies_frame(path, rows())


def read_csv_movies(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """ml-20m and later `movies.csv`: `movieId,title,genres`, titles quoted when they hold a comma."""
    path = Path(path)

    def rows() -> Iterator[tuple[int, int, str, str]]:
        lines = _text_lines(path, encoding)
        numbers: list[int] = []

        def feed() -> Iterator[str]:  # remembers which line each record starts on
            for number, line in lines:
                numbers.append(number)
                yield line + "\n"

        reader = csv.reader(feed(), strict=True)
        consumed = 0
        try:
            for record in reader:
                start, consumed = numbers[consumed], len(numbers)
                if start == 1:
                    if record != ["movieId", "title", "genres"]:
                        raise line_error(path, 1, "expected the header 'movieId,title,genres'", ",".join(record))
                    continue
                if len(record) != 3:
                    raise line_error(path, start, f"expected 3 fields (movieId,title,genres), found {len(record)}",
                                ",".join(record))
                yield start, _movie_id(path, start, record[0], ",".join(record)), record[1], record[2]
        except csv.Error as err:
            raise line_error(path, numbers[consumed] if consumed < len(numbers) else len(numbers),
                        f"malformed CSV ({err})") from None
        if not numbers:
            raise DataError(f"{path} is empty: expected the header 'movieId,title,genres'")

    return _movies_frame(path, rows())


def read_movies(name: str, folder: Path) -> pd.DataFrame:
    """The typed movies frame of dataset `name` in `folder` (the extracted archive folder)."""
    spec, folder = get_spec(name), Path(folder)
    path = folder / spec.movies_file
    if spec.format == "ml-100k":
        return read_100k_movies(path, folder / (spec.genres_file or "u.genre"))
    if spec.format == "dat":
        return read_dat_movies(path, spec.encoding)
    return read_csv_movies(path, spec.encoding)
