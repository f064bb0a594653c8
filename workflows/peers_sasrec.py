"""SASRec as a peer, the project's side: the interactions handed to the peers virtualenv, its lists read back and
ranked by the project's own full-ranking code.

rectools' `SASRecModel` (full softmax cross-entropy, 64 factors, 2 blocks, each user's last 50 ratings; every rating
is an interaction, in time order) runs in `.venv-peers` (`workflows.sasrec_fit`, the hand-over format and the
script). Its training length is chosen on validation with seed 0: one training (fit on train) ranked after each
length of `EPOCHS`. The chosen length is then trained on train + validation with each of `SEEDS` (through the same
stages) and scored on test: the figures are the mean over seeds (the spread logged beside them), the paired interval
against EASE uses seed 0's per-user figures. A user SASRec cannot rank (no rating in the fit data) and the end of a
list shorter than k get the most rated unseen movies, as the served recommender answers a user without a profile.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ncf.data import Ratings
from ncf.evaluation import relevant_targets
from ncf.metrics import K
from ncf.ranking import ScoreFn
from workflows.peers import PeerResult, Protocol
from workflows.retrieval_bench import NDCG, Slice, say
from workflows.sasrec_fit import BLOCKS, FACTORS, MAX_LEN, Lists, Request, read_lists, write_request

SCRIPT = Path(__file__).with_name("sasrec_fit.py")
EPOCHS = (50, 100, 200)
SEEDS = (0, 1, 2)
SPREAD = (NDCG, "full_hit_rate_at_10", "full_recall_at_10")  # the figures whose sd over seeds is logged


def lists_score(users: np.ndarray, top: np.ndarray, fit_on: Ratings, n_users: int, n_movies: int) -> ScoreFn:
    """Catalogue scores that rank each user's list (row of `top` for `users`, -1 where empty) first, in its
    order, then the movies most rated in `fit_on`; users without a list get popularity alone."""
    popularity = np.bincount(fit_on.movie, minlength=n_movies).astype(np.float64)
    fallback = popularity / (popularity.max(initial=0.0) + 1.0)  # in [0, 1): below every listed movie
    k = top.shape[1]
    listed = np.vstack([top, np.full((1, k), -1, dtype=np.int64)])  # the last row: no list
    row_of = np.full(n_users, len(top))
    row_of[users] = np.arange(len(users))
    bonus = np.arange(k, 0, -1, dtype=np.float64) + 1.0  # the list's first movie highest, every one above 1

    def score(batch: np.ndarray) -> np.ndarray:
        scores = np.tile(fallback, (len(batch), 1))
        rows = listed[row_of[np.asarray(batch)]]
        valid = rows >= 0
        scores[np.nonzero(valid)[0], rows[valid]] = np.broadcast_to(bonus, rows.shape)[valid]
        return scores

    return score


def run_sasrec(python: Path, request: Request) -> Lists:
    """The request fitted and ranked by `workflows.sasrec_fit` in the peers virtualenv (`python`)."""
    with tempfile.TemporaryDirectory(prefix="ncf-sasrec-") as tmp:
        request_path, lists_path = Path(tmp) / "request.npz", Path(tmp) / "lists.npz"
        write_request(request_path, request)
        subprocess.run([str(python), str(SCRIPT), str(request_path), str(lists_path)], check=True)
        return read_lists(lists_path)


def ranked_users(part: Slice) -> np.ndarray:
    """The users a slice's evaluation ranks: only their lists are asked for."""
    return relevant_targets(part.target, part.evaluation)[0]


def request_for(part: Slice, epochs: tuple[int, ...], seed: int) -> Request:
    fit_on = part.fit_on
    return Request(fit_on.user, fit_on.movie, fit_on.timestamp, ranked_users(part), K, epochs, seed)


def evaluate_lists(part: Slice, lists: Lists, epochs: int) -> tuple[dict[str, float], np.ndarray]:
    return part.evaluate(lists_score(lists.users, lists.top[epochs], part.fit_on, part.n_users, part.n_movies))


def sasrec(python: Path, grid: tuple[int, ...] = EPOCHS) -> Callable[[Protocol], PeerResult]:
    """SASRec as a peer, fitted by `python` (the peers virtualenv's interpreter), its training length chosen on
    validation from `grid` (ascending)."""
    def measure(p: Protocol) -> PeerResult:
        lists = run_sasrec(python, request_for(p.validation, grid, SEEDS[0]))
        by_length = {epochs: evaluate_lists(p.validation, lists, epochs)[0][NDCG] for epochs in grid}
        chosen = max(by_length, key=by_length.get)
        say(f"  sasrec validation NDCG@10 by epochs: {by_length}; chosen {chosen}")
        stages = tuple(epochs for epochs in grid if epochs <= chosen)
        seeds = []
        for seed in SEEDS:
            lists = run_sasrec(python, request_for(p.test, stages, seed))
            metrics, ndcg = evaluate_lists(p.test, lists, chosen)
            seeds.append((metrics, ndcg, lists.seconds[chosen]))
            say(f"  sasrec seed {seed}: test NDCG@10 {metrics[NDCG]:.4f}")
        metrics = {key: float(np.mean([m[key] for m, _, _ in seeds])) for key in seeds[0][0]}
        extra = {f"test_{key}_sd": float(np.std([m[key] for m, _, _ in seeds], ddof=1)) for key in SPREAD}
        extra |= {f"seed_{seed}/test_{NDCG}": m[NDCG] for seed, (m, _, _) in zip(SEEDS, seeds, strict=True)}
        extra |= {f"val_{NDCG}_epochs_{epochs}": value for epochs, value in by_length.items()}
        settings = {"library": "rectools 0.19 SASRecModel", "loss": "softmax (whole catalogue)", "n_factors": FACTORS,
                    "n_blocks": BLOCKS, "session_max_len": MAX_LEN, "epochs": chosen,
                    "epochs_grid": ",".join(map(str, grid)), "seeds": ",".join(map(str, SEEDS)),
                    "paired_interval_seed": SEEDS[0]}
        return PeerResult("sasrec", metrics, seeds[0][1], float(np.mean([s for _, _, s in seeds])), settings,
                          by_length[chosen], extra)

    return measure
