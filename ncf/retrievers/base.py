"""What every candidate retriever is: the `Retriever` interface, its settings' base, and the file it saves to.

A retriever is fitted on a user x movie interaction matrix (who liked what) and scores a batch of user
PROFILES: rows of a user x movie matrix of each user's kept ratings, possibly weighted. A profile need not
be one the retriever was fitted on (a user's current ratings, a new user's), so a fitted retriever holds
the item side only. A saved retriever is one .npz of plain arrays, loaded and scored with numpy and scipy
alone. This module and the retrievers' own modules import nothing else of `ncf`: the config imports the
registry to type each retriever's section (`retrieval.<name>`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict

FILE_NAME = "retriever.npz"


@dataclass(frozen=True)
class RatedEntries:
    """Users' kept ratings as a user x movie CSR (`matrix`, 1 per rating, entries in CSR order) with each entry's
    `rating` and recency `age` (how many of the user's kept ratings are newer, or days; 0: the newest) aligned
    with `matrix.data`: what a retriever that reads more than who rated what is fitted on and weighs."""

    matrix: sp.csr_matrix
    rating: np.ndarray
    age: np.ndarray


class RetrieverSettings(BaseModel):
    """A retriever's own config section, `retrieval.<name>` (the values live in conf/retrieval.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Retriever(ABC):
    """A candidate retriever, registered by `name` in `ncf.retrievers.RETRIEVERS`.

    `Settings` types its config section, `retrieval.<name>`: `from_settings` builds it, and a tuning space
    searches its keys as `retrieval.<name>.<key>`. `weighs_profiles`: whether it scores the profile
    weighted by recency and rating (`retrieval.recency_half_life`, `retrieval.profile_rating_offset`) or
    the plain 0/1 interactions it was fitted on. Its name is also its row in the baseline metric table.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[RetrieverSettings]]
    weighs_profiles: ClassVar[bool]
    fits_in_seconds: ClassVar[bool] = True  # else a training run's metric table has its row only when it is served

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: RetrieverSettings, seed: int = 0) -> Retriever:
        """An unfitted retriever with `settings` (one BLAS thread: the fit shares the machine)."""

    @abstractmethod
    def fit(self, interactions: sp.csr_matrix) -> Retriever:
        """Fit the item side on a user x movie float32 CSR of interactions; returns self."""

    def fit_entries(self, entries: RatedEntries) -> Retriever:
        """Fit on the kept ratings with their values and ages; most retrievers read who rated what alone (`fit`)."""
        return self.fit(entries.matrix)

    def weigh(self, entries: RatedEntries, configured: np.ndarray) -> np.ndarray:
        """The weight of each entry of a profile it scores, given the configured one (recency and rating, or 1
        where it does not `weighs_profiles`): by default the configured weight."""
        return configured

    @abstractmethod
    def score(self, profiles: sp.csr_matrix) -> np.ndarray:
        """[n_profiles, n_movies] float32 scores of every movie for each profile row; -inf for a movie it cannot
        score (never retrieved)."""

    @abstractmethod
    def evidence(self, profile: sp.csr_matrix, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The profile's movies behind `movie`'s score (one profile row), with their shares: `strongest_first`."""

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Its settings and fitted state as named plain arrays: what `save` writes."""

    @classmethod
    @abstractmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Retriever:
        """The fitted retriever `arrays` describe (also those of files saved by earlier versions)."""

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / FILE_NAME
        np.savez(path, kind=np.asarray(self.name), **self.arrays())
        return path

    @classmethod
    def load(cls, folder: Path) -> Retriever:
        kind, arrays = read(folder)
        if kind != cls.name:
            raise ValueError(f"{Path(folder) / FILE_NAME} holds a '{kind}' retriever, not '{cls.name}'")
        return cls.from_arrays(arrays)


def read(folder: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The kind of retriever saved in `folder` and its arrays."""
    with np.load(Path(folder) / FILE_NAME, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return str(arrays.pop("kind")), arrays


def csr_arrays(prefix: str, matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {f"{prefix}_data": matrix.data, f"{prefix}_indices": matrix.indices, f"{prefix}_indptr": matrix.indptr,
            f"{prefix}_shape": np.asarray(matrix.shape, dtype=np.int64)}


def csr_from(prefix: str, arrays: dict[str, np.ndarray]) -> sp.csr_matrix:
    return sp.csr_matrix((arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"]),
                         shape=tuple(arrays[f"{prefix}_shape"]))


def terms_of(profile: sp.csr_matrix, matrix: sp.csr_matrix, movie: int) -> tuple[np.ndarray, np.ndarray]:
    """The evidence of a score `profile @ matrix` (one profile row) for `movie`: each profile movie i with its term,
    profile weight x matrix[i, movie], strongest first (`strongest_first`)."""
    row = sp.csr_matrix(profile, dtype=np.float32)
    return strongest_first(row.indices, row.data * matrix[row.indices, movie].toarray().ravel(), movie)


def strongest_first(movies: np.ndarray, shares: np.ndarray, movie: int) -> tuple[np.ndarray, np.ndarray]:
    """The evidence for `movie` among `movies` with their `shares` of its score: those with a positive share, the
    movie itself left out, largest share first."""
    keep = (shares > 0) & (movies != movie)
    order = np.argsort(-shares[keep], kind="stable")
    return movies[keep][order].astype(np.int64), shares[keep][order].astype(np.float64)

