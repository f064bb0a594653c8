"""The typed, validated reader of each published ratings format (ml-100k `u.data`, `ratings.dat`,
`ratings.csv`), and of a whole dataset (movies first: every rated movie must be listed) or an ml-100k fold.

A ratings frame has userId int32, movieId int32, rating float32, timestamp int64, in file order. Ratings
are parsed by pyarrow's multi-threaded CSV reader in line-aligned blocks, so 25M rows stay fast and memory
stays bounded; `::`-separated files are rewritten block by block to a one-byte separator first (pandas'
`sep="::"` would fall back to its slow Python engine). Validation is vectorised; only when something is
wrong is the offending line located, and the `DataError` names the file, the line number (1-based, header
counted, as an editor shows it) and the problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from ncf.movielens_files.movies import read_movies
from ncf.movielens_files.specs import (
    DATASETS,
    INT32_MAX,
    INTEGER,
    DataError,
    DatasetSpec,
    get_spec,
    line_error,
    require_file,
)

RATINGS_COLUMNS = ("userId", "movieId", "rating", "timestamp")
BLOCK_BYTES = 32 << 20  # ratings are parsed in line-aligned blocks of about this size
_FLOAT = re.compile(rb"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _allowed_ratings(rating: np.ndarray, half_stars: bool) -> np.ndarray:
    """Mask of ratings in the dataset's scale: half stars 0.5-5, or whole stars 1-5."""
    steps = rating * 2 if half_stars else rating
    lowest, highest = (1, 10) if half_stars else (1, 5)
    return (steps == np.round(steps)) & (steps >= lowest) & (steps <= highest)


def _scale(half_stars: bool) -> str:
    return "half stars 0.5-5" if half_stars else "whole stars 1-5"


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
        if not INTEGER.fullmatch(value):
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
            return line_error(path, first_line + offset, "stray carriage return", line)
        if not line:
            return line_error(path, first_line + offset, "empty line")
        problem = _check_rating_line(line, sep, half_stars)
        if problem:
            return line_error(path, first_line + offset, problem, line)
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
    require_file(path)
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
                raise line_error(path, 1, f"expected the header {header.decode()!r}", got)
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
            raise _locate(path, block, first_line, sep, half_stars) or line_error(
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
    raise line_error(path, line_of(second), f"duplicate (userId {users[second]}, movieId {movies[second]}), "
                                       f"already rated on line {line_of(first)}")


def _check_known_movies(path: Path, rated: np.ndarray, movies: pd.DataFrame, movies_path: Path | None,
                        line_of) -> None:
    listed = np.zeros(int(movies["movieId"].max()) + 2, dtype=bool)
    listed[movies["movieId"].to_numpy()] = True
    unknown = ~listed[np.minimum(rated, len(listed) - 1)]
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        where = movies_path.name if movies_path else "the movies file"
        raise line_error(path, line_of(row), f"movieId {rated[row]} is not in {where} "
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
