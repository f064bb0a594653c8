"""Every user's top-k from a registered model version, computed with Ray Data, written to Parquet.

    python -m jobs.recommend_all [--k 10] [--model NAME] [--version V | --alias champion] [--out DIR]
                                 [--users-per-part N] [--actors N] [--cpus-per-actor N] [--force]

The alias (default `champion`) is resolved once, so every actor ranks with the same version even if
the alias moves meanwhile. Users (by index) are cut into parts of `--users-per-part` consecutive
users; a pool of `--actors` Ray Data actors (`map_batches` with a callable class), each loading the
version once, ranks one part at a time exactly as serving does (`Recommender.rank_profiles` of the
users' stored ratings: retrieval then re-ranking) and writes it to `<out>/parts/part-NNNNN.parquet`
atomically (a hidden temporary file renamed into place). Each part file carries, in its Parquet
metadata, the model, version, k and part layout that made it: a re-run skips the parts already
written, a folder made by another version, k or layout is refused (`--force` rebuilds it). At the
end `<out>/summary.json` holds the users, parts, seconds and users/s. On a multi-node cluster
`--out` must be storage every node sees.

Rows: user_id, rank (1 = best), movie_id, score (the served ranking's score), predicted_rating,
strength, user_weight, movie_weight; a user with fewer than k unseen movies gets fewer rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient

from ncf.files import WriteError, atomic_path, check_writable, write_atomically
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_cluster import init_ray
from serving.model_version import ModelNotFoundError, resolve_version

OUT_ROOT = Path("reports") / "recommendations"  # under the working directory, like the other reports
METADATA_KEY = b"ncf.recommend_all"  # each part file's record of what made it
LAYOUT = ("model", "version", "k", "users_per_part", "n_users")  # what a folder's parts must agree on
SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("movie_id", pa.int64()),
                    ("score", pa.float32()), ("predicted_rating", pa.float32()), ("strength", pa.float32()),
                    ("user_weight", pa.float32()), ("movie_weight", pa.float32())])


class OutputMismatchError(ValueError):
    """The output folder holds parts made by another model version, k or part layout."""


def part_path(parts_dir: Path, part: int) -> Path:
    return parts_dir / f"part-{part:05d}.parquet"


def top_k_table(recommender, users: np.ndarray, k: int) -> pa.Table:
    """The rows of each user's (by index) k best unseen movies, ranked as served, with what the model says
    of each pair."""
    top, scores = recommender.rank_profiles(recommender.profiles_of(users), k)
    n = top.shape[1]
    kept = np.isfinite(scores).ravel()  # -inf: past the end of a user's unseen movies
    user, movie = np.repeat(users, n)[kept], top.ravel()[kept]
    out = recommender.model_alone.explain(user, movie)
    return pa.Table.from_pydict({
        "user_id": recommender.ids.user_ids[user],
        "rank": np.tile(np.arange(1, n + 1, dtype=np.int32), len(users))[kept],
        "movie_id": recommender.ids.movie_ids[movie], "score": scores.ravel()[kept].astype(np.float32),
        "predicted_rating": out["rating"].astype(np.float32), "strength": out["strength"].astype(np.float32),
        "user_weight": out["user_weight"].astype(np.float32), "movie_weight": out["movie_weight"].astype(np.float32),
    }, schema=SCHEMA)


def part_record(path: Path) -> dict | None:
    """What made a part file (its metadata); None when the file is unreadable or has none."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None


class TopKPart:
    """A Ray Data actor: loads the model version once, then ranks and writes whole parts."""

    def __init__(self, model_uri: str, tracking_uri: str, parts_dir: str, layout: dict):
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="ncf-recommend-all-") as tmp:
            self.recommender = mlflow_tracking.load_recommender(model_uri, tmp)  # read into memory
        self.parts_dir = Path(parts_dir)
        self.layout = layout

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row of `batch` is a part (its index and user range); returns what each part took."""
        done = {"part": [], "users": [], "seconds": []}
        for part, first, end in zip(batch["part"], batch["first_user"], batch["end_user"], strict=True):
            start = time.perf_counter()
            table = top_k_table(self.recommender, np.arange(first, end, dtype=np.int64), self.layout["k"])
            record = self.layout | {"part": int(part), "first_user": int(first), "end_user": int(end)}
            table = table.replace_schema_metadata({METADATA_KEY: json.dumps(record).encode()})
            with atomic_path(part_path(self.parts_dir, int(part)), "part") as tmp:  # whole or absent
                pq.write_table(table, tmp)
            for key, value in (("part", part), ("users", end - first), ("seconds", time.perf_counter() - start)):
                done[key].append(value)
        return {key: np.asarray(values) for key, values in done.items()}


def pending_parts(parts_dir: Path, layout: dict, n_parts: int, force: bool) -> list[int]:
    """The parts still to write. Parts made by another version, k or layout are refused, or deleted with
    `force`; unreadable parts and leftover temporary files (a run stopped mid-write) are deleted."""
    for leftover in parts_dir.glob(".part-*.tmp"):
        leftover.unlink(missing_ok=True)
    for path in sorted(parts_dir.glob("part-*.parquet")):
        record = part_record(path)
        if record is None:
            path.unlink()
            continue
        differs = {key: record.get(key) for key in LAYOUT if record.get(key) != layout[key]}
        if differs and not force:
            raise OutputMismatchError(
                f"{parts_dir} holds parts of another run ({', '.join(f'{k}={v}' for k, v in differs.items())}; "
                f"this run: {', '.join(f'{k}={layout[k]}' for k in differs)}): use another --out, or --force "
                "to rebuild it")
        if differs:
            path.unlink()
    return [part for part in range(n_parts) if not part_path(parts_dir, part).exists()]


def run(model: str, version: str | None = None, alias: str = mlflow_tracking.CHAMPION, k: int = 10,
        out: Path | None = None, users_per_part: int = 1000, actors: int = 2, cpus_per_actor: float = 1.0,
        force: bool = False) -> dict:
    """Write every user's top-k of the version; returns the summary (also written to `<out>/summary.json`)."""
    start = time.perf_counter()
    tracking_uri = mlflow_tracking.tracking_uri()
    registered = resolve_version(f"models:/{model}/{version}" if version else f"models:/{model}@{alias}",
                                 MlflowClient(tracking_uri, tracking_uri))
    model_uri = f"models:/{registered.name}/{registered.version}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    n_users = mlflow_tracking.load_id_maps(model_uri).n_users
    n_parts = -(-n_users // users_per_part)
    layout = {"model": registered.name, "version": str(registered.version), "k": k, "users_per_part": users_per_part,
              "n_users": n_users}
    out = (out or OUT_ROOT / registered.name / f"v{registered.version}").resolve()
    parts_dir = check_writable(out / "parts", "recommendations")
    pending = pending_parts(parts_dir, layout, n_parts, force)
    print(f"{model_uri} (run {registered.run_id}): {n_users} users in {n_parts} parts of {users_per_part}, "
          f"k={k} -> {parts_dir}; {n_parts - len(pending)} part(s) already written, {len(pending)} to write",
          flush=True)
    users_written, part_seconds = 0, 0.0  # part_seconds: the actors' time on the parts (ranking and writing)
    if pending:
        import ray  # only when there is work: a run with every part written stays fast

        init_ray()
        todo = [{"part": p, "first_user": p * users_per_part, "end_user": min((p + 1) * users_per_part, n_users)}
                for p in pending]
        finished = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            TopKPart, batch_size=1, batch_format="numpy", num_cpus=cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(todo))),  # `concurrency=` is deprecated
            fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri, "parts_dir": str(parts_dir),
                                   "layout": layout})
        ranking_start = time.perf_counter()
        for n, part in enumerate(finished.iter_rows(), start=1):
            users_written += int(part["users"])
            part_seconds += float(part["seconds"])
            elapsed = time.perf_counter() - ranking_start
            print(f"part {int(part['part']):05d} done ({n}/{len(todo)}): {int(part['users'])} users in "
                  f"{float(part['seconds']):.2f} s; {users_written / elapsed:,.0f} users/s so far", flush=True)
    seconds = time.perf_counter() - start
    summary = {"model": registered.name, "version": str(registered.version), "run_id": registered.run_id, "k": k,
               "users": n_users, "parts": n_parts, "parts_written": len(pending),
               "parts_skipped": n_parts - len(pending), "users_written": users_written,
               "rows": sum(pq.read_metadata(part_path(parts_dir, p)).num_rows for p in range(n_parts)),
               "seconds": round(seconds, 3), "users_per_s": round(users_written / seconds, 1),
               "part_seconds": round(part_seconds, 3)}
    write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n", "summary")
    print(f"{summary['users']} users, {summary['rows']} rows in {n_parts} parts ({len(pending)} written, "
          f"{summary['parts_skipped']} already there) in {seconds:.1f} s: {summary['users_per_s']:,.0f} users/s; "
          f"the actors ranked and wrote for {part_seconds:.1f} s -> {out / 'summary.json'}", flush=True)
    return summary


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def model_name(text: str) -> str:
    if not text or "/" in text or "@" in text:
        raise argparse.ArgumentTypeError(f"a registered model name has no '/' or '@', got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=positive_int, default=10, help="movies per user (default 10)")
    p.add_argument("--model", type=model_name, default=mlflow_tracking.MODEL_NAME,
                   help="registered model name (default %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=positive_int, help="a registered version number")
    which.add_argument("--alias", default=mlflow_tracking.CHAMPION, help="an alias (default %(default)s)")
    p.add_argument("--out", type=Path, help=f"output folder (default {OUT_ROOT}/<model>/v<version>)")
    p.add_argument("--users-per-part", type=positive_int, default=1000, help="users per Parquet part (default 1000)")
    p.add_argument("--actors", type=positive_int, default=2, help="Ray Data actors, each holding the model (default 2)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves (default 1)")
    p.add_argument("--force", action="store_true", help="rebuild an output folder made by another version or k")
    args = p.parse_args(argv)
    try:
        run(args.model, str(args.version) if args.version else None, args.alias, args.k, args.out,
            args.users_per_part, args.actors, args.cpus_per_actor, args.force)
    except (ModelNotFoundError, OutputMismatchError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
