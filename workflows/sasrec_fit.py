"""SASRec as a peer (`make peers`): rectools' `SASRecModel` trained with a cross-entropy over the whole catalogue,
run in a virtualenv of its own (`.venv-peers`, built by `make peers`).

rectools 0.19 needs numpy < 2, pandas < 3 and `pm-implicit`, none of which the project's environment can hold, so
this file is two things:

- the hand-over format, imported by the project (`workflows.peers_sasrec`): it writes a request (the interactions
  to fit on, the users to rank, the settings) with `write_request` and reads each user's top-k back with
  `read_lists`; both are `.npz` files of plain integer arrays, readable by any numpy;
- the script the peers virtualenv runs: `.venv-peers/bin/python workflows/sasrec_fit.py REQUEST LISTS`.

It imports nothing from `ncf` (nor from `workflows`): numpy at the top, rectools and pandas only in the script.
Users and movies are the project's dense indices; a list row is -1 where SASRec has fewer than k movies to offer
(a user it cannot rank: no interactions in the fit data).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The peer as the issue specifies it: 64 factors, 2 blocks, each user's last 50 ratings, full softmax.
FACTORS, BLOCKS, MAX_LEN = 64, 2, 50


@dataclass
class Request:
    """What to fit on and whom to rank. Interactions (`user`, `movie`, `timestamp`, one row per rating) are
    ordered by the model by time; `epochs` are the training lengths to rank after, ascending (one training,
    continued from one length to the next), under torch seed `seed`."""

    user: np.ndarray
    movie: np.ndarray
    timestamp: np.ndarray
    rank_users: np.ndarray
    k: int
    epochs: tuple[int, ...]
    seed: int


@dataclass
class Lists:
    """Each ranked user's top-k movies (-1 where none), best first, per training length, and the seconds each
    length took to train (cumulative)."""

    users: np.ndarray
    top: dict[int, np.ndarray]  # epochs -> [len(users), k]
    seconds: dict[int, float]


def write_request(path: Path, request: Request) -> None:
    np.savez(path, user=request.user.astype(np.int64), movie=request.movie.astype(np.int64),
             timestamp=request.timestamp.astype(np.int64), rank_users=request.rank_users.astype(np.int64),
             k=np.int64(request.k), epochs=np.asarray(request.epochs, dtype=np.int64), seed=np.int64(request.seed))


def read_request(path: Path) -> Request:
    with np.load(path) as f:
        return Request(f["user"], f["movie"], f["timestamp"], f["rank_users"], int(f["k"]),
                       tuple(int(e) for e in f["epochs"]), int(f["seed"]))


def write_lists(path: Path, lists: Lists) -> None:
    arrays = {f"top_{epochs}": top.astype(np.int64) for epochs, top in lists.top.items()}
    arrays |= {f"seconds_{epochs}": np.float64(s) for epochs, s in lists.seconds.items()}
    np.savez(path, users=lists.users.astype(np.int64), **arrays)


def read_lists(path: Path) -> Lists:
    with np.load(path) as f:
        epochs = sorted(int(name.removeprefix("top_")) for name in f.files if name.startswith("top_"))
        return Lists(f["users"], {e: f[f"top_{e}"] for e in epochs}, {e: float(f[f"seconds_{e}"]) for e in epochs})


def fit_and_rank(request: Request) -> Lists:
    """Train SASRec on the request's interactions and rank its users (seen movies left out) after each length."""
    import pandas as pd
    import pytorch_lightning
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel
    from rectools.models.nn.item_net import IdEmbeddingsItemNet

    pytorch_lightning.seed_everything(request.seed, workers=True)
    interactions = pd.DataFrame({Columns.User: request.user, Columns.Item: request.movie, Columns.Weight: 1.0,
                                 Columns.Datetime: pd.to_datetime(request.timestamp, unit="s")})
    dataset = Dataset.construct(interactions)
    model = SASRecModel(n_factors=FACTORS, n_blocks=BLOCKS, session_max_len=MAX_LEN, loss="softmax",
                        item_net_block_types=(IdEmbeddingsItemNet,), deterministic=True, epochs=request.epochs[0])
    known = np.isin(request.rank_users, request.user)
    lists = Lists(request.rank_users, {}, {})
    trained, seconds = 0, 0.0
    for epochs in request.epochs:
        started = time.perf_counter()
        model.fit_partial(dataset, min_epochs=epochs - trained, max_epochs=epochs - trained)
        trained, seconds = epochs, seconds + time.perf_counter() - started
        lists.seconds[epochs] = seconds
        recos = model.recommend(request.rank_users[known], dataset, k=request.k, filter_viewed=True,
                                on_unsupported_targets="ignore")
        top = np.full((len(request.rank_users), request.k), -1, dtype=np.int64)
        row = {user: i for i, user in enumerate(request.rank_users)}
        rows = recos[Columns.User].map(row).to_numpy()
        top[rows, recos[Columns.Rank].to_numpy() - 1] = recos[Columns.Item].to_numpy()
        lists.top[epochs] = top
        print(f"sasrec seed {request.seed}: {epochs} epochs, {seconds:.0f} s", flush=True)
    return lists


if __name__ == "__main__":
    request_path, lists_path = (Path(arg) for arg in sys.argv[1:3])
    write_lists(lists_path, fit_and_rank(read_request(request_path)))
