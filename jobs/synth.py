"""Synthetic MovieLens at a named shape, in the ml-25m CSV format, for benchmarks at sizes we may not download.

    python -m jobs.synth --shape ml-25m --out DIR [--seed 0]

Writes DIR/ratings.csv and DIR/movies.csv that `ncf.movielens_files.ratings.read_dataset("ml-25m", DIR)` reads. The
totals match the shape exactly (ratings rows, distinct users, movies rows). Like the real data: user
activity and movie popularity follow power laws, every user has at least 20 ratings (fewer only for
shapes too small for that), no (user, movie) pair repeats, each user's ratings are written in
increasing time order, some users give whole stars only. Ratings are half stars from latent
user/movie factors + biases + noise, and genres follow the movie factors, so there is signal to learn.

Deterministic by seed. Users are generated and written in chunks of about CHUNK_RATINGS ratings, so
memory stays bounded whatever the shape.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ncf.config import load_config

MEAN_RATING = 3.35  # before the popularity tilt of movie biases: ratings average about 3.5
CHUNK_RATINGS = 2_000_000  # part of the output's definition: changing it changes the data for a seed
FACTORS = 8
MIN_PER_USER = 20  # MovieLens keeps users with at least 20 ratings
MAX_USER_SHARE = 0.5  # the most active user rates at most this share of the catalogue
HEAVY_SHARE = 0.125  # users rating more than this share are sampled one at a time
FIRST_TIME, LAST_TIME = 789_652_009, 1_574_327_703  # the time range of ml-25m
GENRES = {  # ml-25m's genres with roughly their shares of movies
    "Action": 0.12, "Adventure": 0.07, "Animation": 0.05, "Children": 0.05, "Comedy": 0.27, "Crime": 0.09,
    "Documentary": 0.08, "Drama": 0.41, "Fantasy": 0.04, "Film-Noir": 0.006, "Horror": 0.08, "IMAX": 0.003,
    "Musical": 0.02, "Mystery": 0.04, "Romance": 0.13, "Sci-Fi": 0.06, "Thriller": 0.14, "War": 0.03,
    "Western": 0.02,
}
RATING_LABELS = pa.array([f"{k / 2:.1f}" for k in range(1, 11)])  # "0.5" ... "5.0", as MovieLens writes them


@dataclass(frozen=True)
class Shape:
    name: str
    n_users: int
    n_movies: int
    n_ratings: int


SHAPES: dict[str, Shape] = {
    "tiny": Shape("tiny", 50, 200, 2_000),
    "small": Shape("small", 2_000, 3_000, 100_000),
    **{name: Shape(name, published.sizes.users, published.sizes.movies, published.sizes.ratings)  # conf/data.yaml
       for name, published in load_config().data.datasets.items() if published.sizes is not None},
}


def _apportion(weights: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Integers proportional to `weights`, each at most `cap`, summing exactly to `total`."""
    counts = np.zeros(len(weights), dtype=np.int64)
    free = np.ones(len(weights), dtype=bool)
    remaining = total
    while remaining > 0:
        if not free.any():
            raise ValueError(f"cannot place {total:,} ratings with at most {cap:,} per user")
        share = np.where(free, weights, 0.0)
        share = share / share.sum() * remaining
        add = np.floor(share).astype(np.int64)
        short = remaining - int(add.sum())
        if short:  # the largest fractional parts get one more
            add[np.argsort(add - share, kind="stable")[:short]] += 1
        counts += add
        over = counts > cap
        remaining = int((counts[over] - cap).sum())
        counts[over] = cap
        free &= counts < cap
    return counts


def _draw_light(rng: np.random.Generator, need: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """Keys user * n_movies + movie of need[user] distinct movies per user, drawn by popularity.

    Draws with replacement and keeps each user's first distinct movies in draw order: the same
    law as drawing without replacement. Users still short draw again, twice as many each round.
    """
    n_movies = len(cdf)
    need = need.astype(np.int64).copy()
    pending = np.flatnonzero(need > 0)
    previous = np.empty(0, dtype=np.int64)  # kept keys of users still short
    kept = []
    factor = 1.25
    while len(pending):
        users = np.repeat(pending, np.ceil(need[pending] * factor).astype(np.int64) + 4)
        movies = np.minimum(np.searchsorted(cdf, rng.random(len(users)), side="right"), n_movies - 1)
        keys = np.concatenate([previous, users * n_movies + movies])
        _, first = np.unique(keys, return_index=True)
        fresh = keys[np.sort(first[first >= len(previous)])]  # new distinct keys, in draw order
        owner = fresh // n_movies
        order = np.argsort(owner, kind="stable")
        fresh, owner = fresh[order], owner[order]
        rank = np.arange(len(owner)) - np.searchsorted(owner, owner, side="left")
        take = rank < need[owner]
        kept.append(fresh[take])
        need -= np.bincount(owner[take], minlength=len(need))
        pending = pending[need[pending] > 0]
        previous = np.concatenate([previous, fresh[take]])
        previous = previous[need[previous // n_movies] > 0]
        factor *= 2
    return np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)


def _draw_heavy(rng: np.random.Generator, users: np.ndarray, need: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """The same law for users who rate a large part of the catalogue: exponential keys / weight, k smallest."""
    n_movies = len(popularity)
    keys = []
    for user in users:
        scores = rng.exponential(size=n_movies) / popularity
        keys.append(user * n_movies + np.argpartition(scores, need[user] - 1)[: need[user]])
    return np.concatenate(keys) if keys else np.empty(0, dtype=np.int64)


@dataclass
class _World:
    """Everything drawn once for the whole dataset: activity, popularity, factors, biases."""

    counts: np.ndarray  # ratings per user
    popularity: np.ndarray  # per movie, sums to 1
    cdf: np.ndarray
    user_factors: np.ndarray
    user_bias: np.ndarray
    whole_stars: np.ndarray  # users who never give half stars
    movie_factors: np.ndarray
    movie_bias: np.ndarray


def _world(shape: Shape, rng: np.random.Generator) -> _World:
    n_users, n_movies, n_ratings = shape.n_users, shape.n_movies, shape.n_ratings
    floor = max(1, min(MIN_PER_USER, n_ratings // (2 * n_users), n_movies))
    cap = max(floor, min(n_movies, int(np.ceil(MAX_USER_SHARE * n_movies))))
    if n_ratings > n_users * cap or n_ratings < n_users * floor:
        raise ValueError(f"shape {shape}: {n_ratings:,} ratings do not fit {n_users:,} users rating "
                         f"{floor}..{cap} of {n_movies:,} movies")
    activity = rng.pareto(2.0, n_users) + 1e-3  # Lomax, tail exponent 2: the mean is about twice the median
    counts = floor + _apportion(activity, n_ratings - floor * n_users, cap - floor)

    ranks = rng.permutation(n_movies) + 1.0  # popularity rank of each movie
    popularity = (ranks + 100.0) ** -1.6  # Zipf-Mandelbrot: the top movie is rated by about half the users
    popularity /= popularity.sum()
    cdf = np.cumsum(popularity)
    cdf[-1] = 1.0

    scale = (0.6**2 / FACTORS) ** 0.25  # factor dot products with a standard deviation of about 0.6
    log_pop = np.log(popularity)
    movie_bias = rng.normal(0.0, 0.4, n_movies) + 0.1 * (log_pop - log_pop.mean()) / log_pop.std()
    return _World(
        counts=counts, popularity=popularity, cdf=cdf,
        user_factors=rng.normal(0.0, scale, (n_users, FACTORS)).astype(np.float32),
        user_bias=rng.normal(0.0, 0.35, n_users).astype(np.float32),
        whole_stars=rng.random(n_users) < 0.3,
        movie_factors=rng.normal(0.0, scale, (n_movies, FACTORS)).astype(np.float32),
        movie_bias=movie_bias.astype(np.float32),
    )


def _chunk(world: _World, first: int, last: int, rng: np.random.Generator) -> pa.Table:
    """The ratings of users first..last-1 (0-based), each user's rows in time order."""
    n_movies = len(world.popularity)
    need = world.counts[first:last]
    heavy = need > max(1, int(HEAVY_SHARE * n_movies))
    keys = np.concatenate([_draw_light(rng, np.where(heavy, 0, need), world.cdf),
                           _draw_heavy(rng, np.flatnonzero(heavy), need, world.popularity)])
    local = keys // n_movies
    order = np.lexsort((rng.random(len(keys)), local))  # a random time order within each user
    local, movie = local[order], keys[order] % n_movies
    user = local + first

    noise = rng.normal(0.0, 0.8, len(user)).astype(np.float32)
    predicted = (MEAN_RATING + world.user_bias[user] + world.movie_bias[movie] + noise
                 + np.einsum("ij,ij->i", world.user_factors[user], world.movie_factors[movie]))
    halves = np.where(world.whole_stars[user], np.clip(np.round(predicted), 1, 5) * 2,
                      np.clip(np.round(predicted * 2), 1, 10)).astype(np.int64)

    # Time: sessions of ratings seconds apart, days between sessions; squeezed into the time range.
    n = len(user)
    starts = np.concatenate([[0], np.cumsum(need)[:-1]])
    gaps = np.where(rng.random(n) < 0.08, rng.exponential(4 * 86_400.0, n), rng.exponential(40.0, n))
    gaps[starts] = 0.0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[starts], need)
    span = elapsed[starts + need - 1]
    room = 0.9 * (LAST_TIME - FIRST_TIME)
    squeeze = np.minimum(1.0, room / np.maximum(span, 1.0))
    begin = FIRST_TIME + rng.random(len(need)) * (LAST_TIME - FIRST_TIME - span * squeeze - need)
    rank = np.arange(n) - np.repeat(starts, need)  # + rank: strictly increasing after rounding
    stamps = (np.repeat(begin, need) + elapsed * np.repeat(squeeze, need)).astype(np.int64) + rank

    return pa.table({
        "userId": pa.array(user.astype(np.int32) + 1),
        "movieId": pa.array(movie.astype(np.int32) + 1),
        "rating": RATING_LABELS.take(pa.array(halves - 1)),
        "timestamp": pa.array(stamps),
    })


def _movie_rows(world: _World, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """(movieId, title, genres): genres lean on the movie factors, so they carry signal."""
    n_movies = len(world.popularity)
    names = sorted(GENRES)
    directions = rng.normal(0.0, 1.0, (len(names), FACTORS))
    unit = world.movie_factors / np.linalg.norm(world.movie_factors, axis=1, keepdims=True)
    logits = np.log([GENRES[g] for g in names]) + 1.5 * unit @ directions.T
    picked = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=1)
    how_many = 1 + rng.binomial(3, 0.3, n_movies)
    untagged = rng.random(n_movies) < 0.02
    years = np.clip(2019 - np.floor(rng.exponential(18.0, n_movies)), 1902, 2019).astype(int)
    rows = []
    for m in range(n_movies):
        genres = "(no genres listed)" if untagged[m] else "|".join(sorted(names[g] for g in picked[m, :how_many[m]]))
        title = f"Synthetic Movie {m + 1}, The ({years[m]})" if m % 7 == 3 else f"Synthetic Movie {m + 1} ({years[m]})"
        rows.append((m + 1, title, genres))
    return rows


def generate(shape: Shape | str, out: Path, seed: int = 0, *, verbose: bool = True) -> dict[str, int]:
    """Write ratings.csv and movies.csv of `shape` into `out`; returns the totals written."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = _world(shape, np.random.default_rng([seed, 0]))

    bounds = np.searchsorted(np.cumsum(world.counts), np.arange(CHUNK_RATINGS, shape.n_ratings, CHUNK_RATINGS))
    edges = [0, *sorted({int(b) + 1 for b in bounds} - {shape.n_users}), shape.n_users]
    schema = pa.schema([("userId", pa.int32()), ("movieId", pa.int32()), ("rating", pa.string()),
                        ("timestamp", pa.int64())])
    partial = out / ".ratings.csv.partial"
    written = 0
    with open(partial, "wb") as f:
        f.write(b"userId,movieId,rating,timestamp\n")
        with pacsv.CSVWriter(f, schema, write_options=pacsv.WriteOptions(include_header=False,
                                                                         quoting_style="none")) as writer:
            for i, (first, last) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
                table = _chunk(world, first, last, np.random.default_rng([seed, 1, i]))
                writer.write_table(table)
                written += table.num_rows
                if verbose:
                    print(f"synth {shape.name}: users {last:,}/{shape.n_users:,}, ratings {written:,}/"
                          f"{shape.n_ratings:,} ({written / shape.n_ratings:.0%}), "
                          f"{time.perf_counter() - started:.1f} s", flush=True)
    if written != shape.n_ratings:
        raise RuntimeError(f"wrote {written:,} ratings, the shape has {shape.n_ratings:,}")
    os.replace(partial, out / "ratings.csv")

    partial = out / ".movies.csv.partial"
    with open(partial, "w", newline="", encoding="utf-8") as f:
        movies = csv.writer(f, lineterminator="\n")
        movies.writerow(["movieId", "title", "genres"])
        movies.writerows(_movie_rows(world, np.random.default_rng([seed, 2])))
    os.replace(partial, out / "movies.csv")
    if verbose:
        print(f"synth {shape.name}: wrote {out} in {time.perf_counter() - started:.1f} s", flush=True)
    return {"ratings": written, "users": shape.n_users, "movies": shape.n_movies}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a synthetic MovieLens dataset (ml-25m CSV format) at a named shape.")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="users / movies / ratings to generate")
    p.add_argument("--out", required=True, type=Path, help="folder for ratings.csv and movies.csv")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.perf_counter()
    generate(args.shape, args.out, args.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"done: {time.perf_counter() - started:.1f} s wall, peak RSS {peak:.2f} GiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
