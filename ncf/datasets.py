"""The MovieLens family: a registry of published datasets and a typed, verified reader for each format.

Every reader returns the same two typed frames, whatever the published format:

- ratings: userId int32, movieId int32, rating float32, timestamp int64 (file order);
- movies: movieId int32, title str, genres str ('|'-joined, "(no genres listed)" when none).

Ratings are parsed by pyarrow's multi-threaded CSV reader in line-aligned blocks, so 25M rows stay
fast and memory stays bounded; `::`-separated files are rewritten block by block to a one-byte
separator first (pandas' `sep="::"` would fall back to its slow Python engine). Validation is
vectorised; only when something is wrong is the offending line located, and the `DataError` names
the file, the line number (1-based, header counted, as an editor shows it) and the problem.

Where each dataset comes from and what it is checked against (archive URL, SHA-256 digests, published
sizes) is config: `data.datasets` in conf/data.yaml. This module holds how each one is read.

Pure computing code: no Ray, no MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

FORMATS = ("ml-100k", "dat", "csv")
NO_GENRES = "(no genres listed)"
RATINGS_COLUMNS = ("userId", "movieId", "rating", "timestamp")
INT32_MAX = 2**31 - 1
BLOCK_BYTES = 32 << 20  # ratings are parsed in line-aligned blocks of about this size


class DataError(ValueError):
    """The data is missing, corrupt or violates the schema; the message says where."""


# ----------------------------------------------------------------------------- digests


def sha256_normalised(path: Path, block: int = 1 << 24) -> str:
    """SHA-256 of a text file with CRLF line endings turned into LF, streamed `block` bytes at a time
    (the large MovieLens files are GBs)."""
    digest = hashlib.sha256()
    carry = b""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            data = carry + chunk
            carry = b"\r" if data.endswith(b"\r") else b""  # a CRLF may straddle two reads
            digest.update(data[: len(data) - len(carry)].replace(b"\r\n", b"\n"))
    digest.update(carry)
    return digest.hexdigest()


def verify_checksums(folder: Path, expected: Mapping[str, str]) -> dict[str, str]:
    """Check every file named in `expected`; return the digests (logged with each run)."""
    digests = {}
    for name, want in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{path} is missing")
        got = sha256_normalised(path)
        if got != want:
            raise DataError(f"{path} is corrupt or modified: sha256 {got}, expected {want}")
        digests[name] = got
    return digests


# ----------------------------------------------------------------------------- registry


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


# ----------------------------------------------------------------------------- helpers


def _show(line: bytes | str) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return repr(text if len(text) <= 120 else text[:117] + "...")


def _fail(path: Path, line: int, problem: str, content: bytes | str | None = None) -> DataError:
    shown = f": {_show(content)}" if content is not None else ""
    return DataError(f"{path}, line {line}: {problem}{shown}")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    return path


_INT = re.compile(rb"-?[0-9]+")
_FLOAT = re.compile(rb"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _allowed_ratings(rating: np.ndarray, half_stars: bool) -> np.ndarray:
    """Mask of ratings in the dataset's scale: half stars 0.5-5, or whole stars 1-5."""
    steps = rating * 2 if half_stars else rating
    lowest, highest = (1, 10) if half_stars else (1, 5)
    return (steps == np.round(steps)) & (steps >= lowest) & (steps <= highest)


def _scale(half_stars: bool) -> str:
    return "half stars 0.5-5" if half_stars else "whole stars 1-5"


# ----------------------------------------------------------------------------- ratings


def _line_blocks(path: Path, size: int) -> Iterator[tuple[bytes, int, bool]]:
    """(block of whole lines, number of its first line, is it the last) for a file read `size` bytes at a time."""

    def blocks() -> Iterator[tuple[bytes, int]]:
        line, rest = 1, b""
        with open(path, "rb") as f:
            while data := f.read(size):
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    rest = data
                    continue
                rest = data[cut:]
                yield data[:cut], line
                line += data.count(b"\n", 0, cut)
        if rest:
            yield rest, line

    previous = None
    for item in blocks():
        if previous is not None:
            yield (*previous, False)
        previous = item
    if previous is not None:
        yield (*previous, True)


def _check_rating_line(line: bytes, sep: bytes, half_stars: bool) -> str | None:
    """What is wrong with one ratings line, or None: the slow path, run only to locate a failure."""
    fields = line.split(sep)
    if len(fields) != 4:
        return f"expected 4 fields separated by {sep.decode()!r}, found {len(fields)}"
    for name, raw in zip(RATINGS_COLUMNS, fields, strict=True):
        value = raw.strip(b" ")  # as pyarrow does
        if name == "rating":
            if not _FLOAT.fullmatch(value):
                return f"rating {value.decode('utf-8', 'replace')!r} is not a number"
            if not _allowed_ratings(np.array([float(value)]), half_stars)[0]:
                return f"rating {float(value)} outside the allowed values ({_scale(half_stars)})"
            continue
        if not _INT.fullmatch(value):
            return f"non-integer {name} {value.decode('utf-8', 'replace')!r}"
        number = int(value)
        if name != "timestamp" and not 1 <= number <= INT32_MAX:
            return f"{name} {number} outside 1..{INT32_MAX}"
        if name == "timestamp" and not -(2**63) <= number < 2**63:
            return f"timestamp {number} does not fit 64 bits"
    return None


def _locate(path: Path, block: bytes, first_line: int, sep: bytes, half_stars: bool) -> DataError | None:
    """The first bad line of a block as a DataError, or None if every line looks right."""
    lines = block.split(b"\n")
    if not lines[-1]:
        lines.pop()  # after the block's last newline
    for offset, raw in enumerate(lines):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if b"\r" in line:
            return _fail(path, first_line + offset, "stray carriage return", line)
        if not line:
            return _fail(path, first_line + offset, "empty line")
        problem = _check_rating_line(line, sep, half_stars)
        if problem:
            return _fail(path, first_line + offset, problem, line)
    return None


_CONVERT = pacsv.ConvertOptions(
    column_types={"userId": pa.int32(), "movieId": pa.int32(), "rating": pa.float32(), "timestamp": pa.int64()},
    null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False)


def _parse_block(path: Path, block: bytes, first_line: int, sep: bytes, half_stars: bool) -> pa.Table:
    """One block through pyarrow; on any failure the slow scan names the line."""
    last = first_line + block.count(b"\n")
    if b"\r" in block and block.count(b"\r") != block.count(b"\r\n"):  # a stray CR would shift rows vs lines
        raise _locate(path, block, first_line, sep, half_stars) or DataError(
            f"{path}, lines {first_line}-{last}: stray carriage return")
    one_byte = sep if len(sep) == 1 else b"\t"
    data = block if len(sep) == 1 else block.replace(sep, one_byte)
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data), read_options=pacsv.ReadOptions(column_names=list(RATINGS_COLUMNS)),
            parse_options=pacsv.ParseOptions(delimiter=one_byte.decode(), quote_char=False, double_quote=False,
                                             escape_char=False, newlines_in_values=False, ignore_empty_lines=False),
            convert_options=_CONVERT)
    except pa.ArrowInvalid as err:
        error = _locate(path, block, first_line, sep, half_stars)
        raise error or DataError(f"{path}, lines {first_line}-{last}: {err}") from None
    expected = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    if table.num_rows != expected:  # e.g. a separator byte inside a field of a '::' file
        raise _locate(path, block, first_line, sep, half_stars) or DataError(
            f"{path}, lines {first_line}-{first_line + expected - 1}: {table.num_rows} rows for {expected} lines")
    return table


def _count_lines(path: Path, block: int = 1 << 24) -> int:
    """An upper bound on the rows of a file (newlines + 1): one cheap pass lets the parser fill
    preallocated arrays instead of concatenating blocks, which would double the peak memory."""
    count = 1
    with open(path, "rb") as f:
        while chunk := f.read(block):
            count += chunk.count(b"\n")
    return count


_DTYPES = {"userId": np.int32, "movieId": np.int32, "rating": np.float32, "timestamp": np.int64}


def _read_ratings(path: Path, sep: bytes, half_stars: bool, header: bytes | None = None,
                  movies: pd.DataFrame | None = None, movies_path: Path | None = None,
                  block_bytes: int | None = None) -> pd.DataFrame:
    """Parse, then check values, duplicates and (given `movies`) that every rated movie is listed."""
    _require(path)
    block_bytes = block_bytes or BLOCK_BYTES
    capacity = _count_lines(path)
    columns = {c: np.empty(capacity, dtype=dtype) for c, dtype in _DTYPES.items()}
    starts: list[tuple[int, int]] = []  # (first row, first line) of each block
    rows = 0
    saw_header = header is None
    for block, first_line, last in _line_blocks(path, block_bytes):
        if not saw_header:
            end = block.find(b"\n")
            got = (block if end < 0 else block[:end]).rstrip(b"\r")
            if got != header:
                raise _fail(path, 1, f"expected the header {header.decode()!r}", got)
            block, first_line, saw_header = block[end + 1:] if end >= 0 else b"", 2, True
        if last:
            block = block.rstrip(b"\r\n")  # blank lines at the very end are harmless
        if not block:
            continue
        table = _parse_block(path, block, first_line, sep, half_stars)
        end = rows + table.num_rows
        for c in RATINGS_COLUMNS:
            at = rows
            for chunk in table.column(c).chunks:
                columns[c][at: at + len(chunk)] = chunk.to_numpy()
                at += len(chunk)
        del table
        users, rated, rating = (columns[c][rows:end] for c in ("userId", "movieId", "rating"))
        bad = (users < 1) | (rated < 1) | ~_allowed_ratings(rating, half_stars)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise _locate(path, block, first_line, sep, half_stars) or _fail(
                path, first_line + row, "invalid value")
        starts.append((rows, first_line))
        rows = end
    if not saw_header:
        raise DataError(f"{path} is empty: expected the header {header.decode()!r}")
    if rows == 0:
        raise DataError(f"{path} holds no ratings")
    columns = {c: array[:rows] for c, array in columns.items()}
    first_rows = np.array([s[0] for s in starts])
    first_lines = np.array([s[1] for s in starts])

    def line_of(row: int) -> int:
        b = int(np.searchsorted(first_rows, row, side="right")) - 1
        return int(first_lines[b] + row - first_rows[b])

    _check_duplicates(path, columns["userId"], columns["movieId"], line_of)
    if movies is not None:
        _check_known_movies(path, columns["movieId"], movies, movies_path, line_of)
    return pd.DataFrame(columns, copy=False)


def _check_duplicates(path: Path, users: np.ndarray, movies: np.ndarray, line_of) -> None:
    """No (user, movie) twice: an O(n) pass when the file is sorted by both, else a sort."""
    key = (users.astype(np.int64) << 32) | movies.astype(np.int64)
    if len(key) < 2 or bool((key[1:] > key[:-1]).all()):
        return
    ordered = np.sort(key)
    if not (ordered[1:] == ordered[:-1]).any():
        return
    del ordered
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    second = int(order[repeats].min())  # the first repeat in file order
    first = int(order[np.searchsorted(ordered, key[second])])
    raise _fail(path, line_of(second), f"duplicate (userId {users[second]}, movieId {movies[second]}), "
                                       f"already rated on line {line_of(first)}")


def _check_known_movies(path: Path, rated: np.ndarray, movies: pd.DataFrame, movies_path: Path | None,
                        line_of) -> None:
    listed = np.zeros(int(movies["movieId"].max()) + 2, dtype=bool)
    listed[movies["movieId"].to_numpy()] = True
    unknown = ~listed[np.minimum(rated, len(listed) - 1)]
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        where = movies_path.name if movies_path else "the movies file"
        raise _fail(path, line_of(row), f"movieId {rated[row]} is not in {where} "
                                        f"({int(unknown.sum())} rating(s) of unlisted movies)")


def read_100k_ratings(path: Path, movies: pd.DataFrame | None = None) -> pd.DataFrame:
    """ml-100k `u.data` (and the fold files): `user item rating timestamp`, tab-separated, no header."""
    return _read_ratings(Path(path), b"\t", half_stars=False, movies=movies, movies_path=_sibling(path, "u.item"))


def read_dat_ratings(path: Path, *, half_stars: bool, movies: pd.DataFrame | None = None) -> pd.DataFrame:
    """ml-1m / ml-10m `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header."""
    return _read_ratings(Path(path), b"::", half_stars, movies=movies, movies_path=_sibling(path, "movies.dat"))


def read_csv_ratings(path: Path, *, half_stars: bool = True, movies: pd.DataFrame | None = None) -> pd.DataFrame:
    """ml-20m and later `ratings.csv`: the header `userId,movieId,rating,timestamp`, then plain numbers."""
    return _read_ratings(Path(path), b",", half_stars, header=b"userId,movieId,rating,timestamp", movies=movies,
                         movies_path=_sibling(path, "movies.csv"))


def _sibling(path: Path, name: str) -> Path:
    return Path(path).with_name(name)


# ----------------------------------------------------------------------------- movies


def _text_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without its ending); blank lines at the end of the file are dropped."""
    lines = _require(path).read_bytes().split(b"\n")
    while lines and not lines[-1].strip(b"\r"):
        lines.pop()
    for number, raw in enumerate(lines, 1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            yield number, raw.decode(encoding)
        except UnicodeDecodeError as err:
            raise _fail(path, number, f"not valid {encoding} ({err.reason} at byte {err.start})", raw) from None


def _movie_id(path: Path, number: int, value: str, line: str) -> int:
    if not _INT.fullmatch(value.encode()) or not 1 <= int(value) <= INT32_MAX:
        raise _fail(path, number, f"non-integer movieId {value!r}", line)
    return int(value)


def _movies_frame(path: Path, rows: Iterator[tuple[int, int, str, str]]) -> pd.DataFrame:
    ids, titles, genres, seen = [], [], [], {}
    for number, movie_id, title, genre in rows:
        if movie_id in seen:
            raise _fail(path, number, f"duplicate movieId {movie_id}, already on line {seen[movie_id]}")
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
        if not sep or not _INT.fullmatch(index.encode()) or not name:
            raise _fail(path, number, "expected 'name|index'", line)
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
                raise _fail(path, number, f"expected {5 + len(names)} fields separated by '|' "
                                          f"(5 + {len(names)} genre flags), found {len(fields)}", line)
            flags = fields[5:]
            if any(flag not in ("0", "1") for flag in flags):
                raise _fail(path, number, "genre flags must be 0 or 1", line)
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
                raise _fail(path, number, f"expected 3 fields separated by '::', found {len(fields)}", line)
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
                        raise _fail(path, 1, "expected the header 'movieId,title,genres'", ",".join(record))
                    continue
                if len(record) != 3:
                    raise _fail(path, start, f"expected 3 fields (movieId,title,genres), found {len(record)}",
                                ",".join(record))
                yield start, _movie_id(path, start, record[0], ",".join(record)), record[1], record[2]
        except csv.Error as err:
            raise _fail(path, numbers[consumed] if consumed < len(numbers) else len(numbers),
                        f"malformed CSV ({err})") from None
        if not numbers:
            raise DataError(f"{path} is empty: expected the header 'movieId,title,genres'")

    return _movies_frame(path, rows())


# ----------------------------------------------------------------------------- datasets


def read_movies(name: str, folder: Path) -> pd.DataFrame:
    """The typed movies frame of dataset `name` in `folder` (the extracted archive folder)."""
    spec, folder = get_spec(name), Path(folder)
    path = folder / spec.movies_file
    if spec.format == "ml-100k":
        return read_100k_movies(path, folder / (spec.genres_file or "u.genre"))
    if spec.format == "dat":
        return read_dat_movies(path, spec.encoding)
    return read_csv_movies(path, spec.encoding)


def _ratings_reader(spec: DatasetSpec, path: Path, movies: pd.DataFrame | None) -> pd.DataFrame:
    if spec.format == "ml-100k":
        return read_100k_ratings(path, movies)
    if spec.format == "dat":
        return read_dat_ratings(path, half_stars=spec.half_stars, movies=movies)
    return read_csv_ratings(path, half_stars=spec.half_stars, movies=movies)


def read_dataset(name: str, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ratings, movies), typed and validated: every line well formed, ratings on the dataset's scale,
    no duplicate (user, movie), every rated movie listed in the movies file."""
    spec, folder = get_spec(name), Path(folder)
    movies = read_movies(name, folder)
    return _ratings_reader(spec, folder / spec.ratings_file, movies), movies


def read_fold(folder: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An ml-100k predefined split (`u1`..`u5`, `ua`, `ub`): the typed (train, test) frames of
    `<name>.base` and `<name>.test`, in the u.data format."""
    folds = DATASETS["ml-100k"].folds
    if name not in folds:
        raise DataError(f"unknown ml-100k fold '{name}'; known: {', '.join(folds)}")
    folder = Path(folder)
    return read_100k_ratings(folder / f"{name}.base"), read_100k_ratings(folder / f"{name}.test")


class Sizes(Protocol):
    """A dataset's published sizes (config: `data.datasets.<name>.sizes`)."""

    ratings: int  # rows of the ratings file
    users: int  # distinct users
    movies: int  # rows of the movies file (some movies have no rating)


def sizes_are_the_check(name: str, sha256: Mapping[str, str]) -> bool:
    """Where the ratings and movies files both have a known digest, a match is the verification; where
    either has none, the published sizes are checked (after every line has been parsed and validated)."""
    spec = get_spec(name)
    return not {spec.ratings_file, spec.movies_file} <= set(sha256)


def how_verified(name: str, sha256: Mapping[str, str], sizes: Sizes | None) -> str:
    """One line for the log: what the verification of dataset `name` rested on."""
    spec = get_spec(name)
    if not sizes_are_the_check(name, sha256):
        return f"{name}: SHA-256 of {', '.join(sorted(sha256))} matched; every line parsed and validated"
    files = f"{spec.ratings_file}, {spec.movies_file}"
    if sizes is not None:
        return (f"{name}: no SHA-256 known for {files}: every line parsed and validated, and the sizes match "
                f"the published ones ({sizes.ratings:,} ratings, {sizes.users:,} users, {sizes.movies:,} movies)")
    return (f"{name}: no SHA-256 and no published sizes known for {files}: every line parsed and validated "
            "(structure only)")


def check_sizes(name: str, folder: Path, ratings: pd.DataFrame, movies: pd.DataFrame,
                sizes: Sizes | None) -> dict[str, int]:
    """The sizes found (ratings rows, distinct users, movies rows); a DataError where they differ from `sizes`."""
    spec = get_spec(name)
    found = {"ratings": len(ratings), "users": int(pd.unique(ratings["userId"]).size), "movies": len(movies)}
    for what, count in found.items():
        published = getattr(sizes, what) if sizes is not None else None
        if published is not None and count != published:
            file = spec.movies_file if what == "movies" else spec.ratings_file
            raise DataError(f"{Path(folder) / file}: {count:,} {what}, but the published {name} has {published:,}: "
                            f"truncated, extended or another dataset (for a folder that is not the published "
                            f"dataset, e.g. a synthetic one, set data.datasets.{name}.sizes=null)")
    return found


@dataclass(frozen=True)
class Verification:
    """What `verify` checked: the digests it compared, the sizes it found, and how (a line for the log)."""

    name: str
    sha256: dict[str, str]
    ratings: int
    users: int
    movies: int
    folds: dict[str, tuple[int, int]]  # name -> (train rows, test rows)
    method: str


def verify(name: str, folder: Path, *, sha256: Mapping[str, str] | None = None,
           sizes: Sizes | None = None) -> Verification:
    """Verify dataset `name` in `folder`, or raise a DataError that names the file.

    Files with a known digest (`sha256`: config `data.datasets.<name>.sha256`) must match it, CRLF
    normalised. Every line is then parsed and validated, and where the ratings and movies files have
    no known digest, the sizes (ratings, distinct users, movies) must equal the published `sizes`
    (None: not compared, for fixtures and synthetic data): that structure + count check is the
    verification of the datasets without known digests. Folds, where the dataset has them, must each
    split all the ratings into disjoint train and test parts.
    """
    spec, folder, sha256 = get_spec(name), Path(folder), dict(sha256 or {})
    digests = verify_checksums(folder, sha256)
    ratings, movies = read_dataset(name, folder)
    found = check_sizes(name, folder, ratings, movies, sizes if sizes_are_the_check(name, sha256) else None)
    folds = {}
    for fold in spec.folds:
        if not (folder / f"{fold}.base").is_file() and not (folder / f"{fold}.test").is_file():
            continue  # folds are optional
        train, test = read_fold(folder, fold)
        check_fold(folder, fold, ratings, train, test)
        folds[fold] = (len(train), len(test))
    return Verification(name, digests, found["ratings"], found["users"], found["movies"], folds,
                        how_verified(name, sha256, sizes))


def check_fold(folder: Path, fold: str, ratings: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame) -> None:
    """A fold's train and test parts are disjoint and together are all the ratings (u.data)."""

    def keys(frame: pd.DataFrame) -> np.ndarray:
        return (frame["userId"].to_numpy(np.int64) << 32) | frame["movieId"].to_numpy(np.int64)

    shared = np.intersect1d(keys(train), keys(test))
    if len(shared):
        raise DataError(f"{folder / fold}.test shares {len(shared)} (user, movie) pair(s) with {fold}.base")
    if not np.array_equal(np.sort(np.concatenate([keys(train), keys(test)])), np.sort(keys(ratings))):
        raise DataError(f"{folder / fold}.base + {fold}.test ({len(train) + len(test):,} rows) are not "
                        f"the {len(ratings):,} ratings of u.data")
