"""Candidate retrievers, chosen by name (`retrieval.retriever`): the registry.

The NCF model regresses ratings, which ranks the catalogue below popularity; a retriever fitted on
who-rated-what ranks far better. The served recommender re-ranks each user's top-N unseen retrieved movies
by a blend of the standardised retriever score and the NCF's (`ncf.ranking`).

Every retriever implements `ncf.retrievers.base.Retriever` in its own module and is listed once, here:
its config section (`retrieval.<name>`), the check of `retrieval.retriever`, the baseline rows of the metric
table and loading a saved retriever all follow this registry. What the retrievers read is built from ratings
by `ncf.retrievers.matrices`; the sequence signal blended into their scores is `ncf.retrievers.sequence`.
A pure computing package (numpy, scipy, `implicit` to fit ALS, torch to train the history model): no Ray, no
MLflow.
"""

from __future__ import annotations

from pathlib import Path

from ncf.retrievers.als import ALS
from ncf.retrievers.base import FILE_NAME, Retriever, read
from ncf.retrievers.ease import EASE
from ncf.retrievers.history import History
from ncf.retrievers.itemknn import ItemKNN

RETRIEVERS: dict[str, type[Retriever]] = {cls.name: cls for cls in (EASE, ALS, ItemKNN, History)}
NO_RETRIEVER = "none"  # `retrieval.retriever: none`: the model alone ranks the whole catalogue


def retriever_class(name: str) -> type[Retriever]:
    if name not in RETRIEVERS:
        raise ValueError(f"'{name}' is not a registered retriever: {', '.join(RETRIEVERS)} (or {NO_RETRIEVER})")
    return RETRIEVERS[name]


def load_retriever(folder: Path) -> Retriever:
    """Whichever retriever `Retriever.save` wrote into `folder`."""
    kind, _ = read(folder)
    if kind not in RETRIEVERS:
        raise ValueError(f"{Path(folder) / FILE_NAME} holds an unknown retriever '{kind}'")
    return RETRIEVERS[kind].load(folder)


__all__ = ["ALS", "EASE", "FILE_NAME", "NO_RETRIEVER", "RETRIEVERS", "History", "ItemKNN", "Retriever",
           "load_retriever", "retriever_class"]
