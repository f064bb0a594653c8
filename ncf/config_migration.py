"""Configs saved under older key names or before keys existed, read as today's: the renamed keys
(`RENAMED_KEYS`) moved to their current places, and the keys added since (`ADDED_KEYS`) completed with the values
that reproduce the behaviour before them. `ncf.config` applies the renames to every config it reads; a registered
model completes its saved sections with `saved_section`."""

from __future__ import annotations

from typing import Any

# Keys renamed since models were first registered: each retriever's settings and the sequence signal's were
# flat `retrieval.<name>_<key>` keys before they became sections of their own. Configs saved with registered
# models, presets and `--set` overrides that use the old names load as if they used the new ones.
RENAMED_KEYS: dict[str, str] = {
    "retrieval.ease_lambda": "retrieval.ease.regularization",
    "retrieval.ease_max_items": "retrieval.ease.max_items",
    "retrieval.als_factors": "retrieval.als.factors",
    "retrieval.als_regularization": "retrieval.als.regularization",
    "retrieval.als_iterations": "retrieval.als.iterations",
    "retrieval.sequence_weight": "retrieval.sequence.weight",
    "retrieval.sequence_window": "retrieval.sequence.window",
    "retrieval.sequence_last": "retrieval.sequence.last",
    "retrieval.sequence_decay": "retrieval.sequence.decay",
}


def current_key(dotted_key: str) -> str:
    """The name `dotted_key` has now (RENAMED_KEYS)."""
    return RENAMED_KEYS.get(dotted_key, dotted_key)


def with_current_keys(tree: dict) -> dict:
    """A copy of a config tree (sections of values) with every renamed key moved to its current place."""
    tree = {name: dict(values) if isinstance(values, dict) else values for name, values in tree.items()}
    for old, new in RENAMED_KEYS.items():
        section, _, leaf = old.partition(".")
        if isinstance(tree.get(section), dict) and leaf in tree[section]:
            value = tree[section].pop(leaf)
            *parents, last = new.split(".")
            node = tree
            for part in parents:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node[last] = value
    return tree


# Keys added to the config since models were first registered, each with the value that reproduces the
# behaviour before it: a saved config without the key loads with that value (`saved_section`). Of the
# `evaluation` section (added since too), which shapes how a run is evaluated, a loaded model reads only the
# rating it counts as liked (/explain's "because you rated"): 4.0, as before the key existed.
ADDED_KEYS: dict[str, dict[str, Any]] = {
    "model": {"sparse_embeddings": False, "history_length": 50},
    "evaluation": {"relevant_rating": 4.0, "seed_relevant_rating": 3.0},
    "retrieval": {"profile_rating_offset": None, "sequence": {"weight": 0.0, "window": 10, "last": 10, "decay": 0.7},
                  "itemknn": {"neighbours": 100, "shrink": 10.0},
                  "history": {"dimension": 600, "epochs": 100, "learning_rate": 0.003, "item_dropout": 0.5,
                              "weight_decay": 0.0, "batch_users": 1024}},
}


def _completed(added: dict, saved: dict) -> dict:
    """`saved` with what `added` holds and it lacks, section by nested section."""
    out = dict(saved)
    for key, value in added.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _completed(value, out[key])
    return out


def saved_section(name: str, saved: dict) -> dict:
    """Section `name` of a config saved with a model, its renamed keys moved (RENAMED_KEYS) and completed with
    the keys added since (ADDED_KEYS), so registered models keep loading as the config grows. Independent of
    conf/: a registered model loads from its own copy of the package, which carries no config files."""
    return _completed(ADDED_KEYS.get(name, {}), with_current_keys({name: saved})[name])
