"""Config: defaults from conf/, typed overrides, errors that name the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ncf.config import (
    SECTIONS,
    Config,
    ConfigError,
    RetrievalConfig,
    config_from_dict,
    flatten,
    load_config,
    save_config,
    with_values,
)
from ncf.config_files import default_conf_dir
from ncf.config_migration import saved_section
from ncf.retrievers import RETRIEVERS


@pytest.fixture
def conf_copy(tmp_path: Path) -> Path:
    """A writable copy of conf/ to break on purpose."""
    target = tmp_path / "conf"
    shutil.copytree(default_conf_dir(), target)
    return target


def test_defaults_are_the_deck_model():
    config = load_config()
    assert config.model.embedding_dim == 128
    assert config.model.hidden_dims == [512, 256, 128, 64]
    assert config.model.dropouts == [0.3, 0.2, 0.1, 0.0]
    assert config.model.batch_norm is True
    assert (config.model.rating_min, config.model.rating_max) == (0.5, 5.0)
    assert config.model.use_bias is False and config.model.use_genres is False
    assert config.data.split.protocol == "seed"
    assert config.data.split.test_fraction == 0.2
    assert config.data.name == "ml-latest-small"
    assert set(config.data.published.sha256) == {"links.csv", "movies.csv", "ratings.csv", "tags.csv"}


def test_override_changes_value_with_its_type():
    config = load_config(["model.embedding_dim=64", "train.learning_rate=0.01", "model.use_bias=true",
                          "model.hidden_dims=[32, 16]", "model.dropouts=[0.1, 0.0]", "data.split.protocol=random"])
    assert config.model.embedding_dim == 64 and type(config.model.embedding_dim) is int
    assert config.train.learning_rate == 0.01 and isinstance(config.train.learning_rate, float)
    assert config.model.use_bias is True
    assert config.model.hidden_dims == [32, 16]
    assert config.model.dropouts == [0.1, 0.0]
    assert config.data.split.protocol == "random"
    # Defaults are untouched by another call's overrides.
    assert load_config().model.embedding_dim == 128


def test_unknown_override_key_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.embeding_dim"):
        load_config(["model.embeding_dim=3"])


def test_unknown_override_section_names_it():
    with pytest.raises(ConfigError, match=r"modle"):
        load_config(["modle.embedding_dim=3"])


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(["model.embedding_dim"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size") as err:
        load_config(["train.batch_size=abc"])
    assert "integer" in str(err.value)


def test_out_of_range_value_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.split\.test_fraction"):
        load_config(["data.split.test_fraction=1.5"])


def test_profile_rating_offset_must_leave_every_kept_rating_a_positive_weight():
    assert load_config(["retrieval.profile_rating_offset=3.5"]).retrieval.profile_rating_offset == 3.5
    with pytest.raises(ConfigError, match=r"retrieval.profile_rating_offset \(4.0\) must be below the lowest rating"):
        load_config(["retrieval.profile_rating_offset=4.0"])
    with pytest.raises(ConfigError, match=r"min_rating 0.5"):
        load_config(["retrieval.min_rating=null", "retrieval.profile_rating_offset=1.0"])


def test_each_retriever_has_its_own_section():
    retrieval = load_config(["retrieval.retriever=itemknn", "retrieval.itemknn.neighbours=7"]).retrieval
    assert retrieval.retriever == "itemknn" and retrieval.itemknn.neighbours == 7
    assert set(RETRIEVERS) <= set(RetrievalConfig.model_fields)
    assert (retrieval.ease.regularization, retrieval.ease.max_items) == (250.0, 2000)
    assert (retrieval.als.factors, retrieval.sequence.weight) == (64, 0.0)
    with pytest.raises(ConfigError, match=r"retrieval\.itemknn\.neighbours"):
        load_config(["retrieval.itemknn.neighbours=0"])
    with pytest.raises(ConfigError, match=r"retrieval\.ease\.lamda: unknown key"):
        config_from_dict(load_config().model_dump() | {"retrieval": load_config().retrieval.model_dump() | {
            "ease": {"regularization": 1.0, "max_items": None, "lamda": 2.0}}})


def test_an_unknown_retriever_names_the_registered_ones():
    assert load_config(["retrieval.retriever=none"]).retrieval.retriever == "none"
    with pytest.raises(ConfigError, match=r"retrieval\.retriever: .*'knn' is not a registered retriever: "
                                          + ", ".join(RETRIEVERS) + r" \(or none\)"):
        load_config(["retrieval.retriever=knn"])


def test_the_flat_retrieval_keys_of_earlier_versions_still_load(conf_copy: Path):
    """`retrieval.ease_lambda` and its kind became `retrieval.ease.regularization` and so on: overrides, presets
    and configs saved with registered models that use the old names mean the new keys."""
    old = load_config(["retrieval.ease_lambda=75", "retrieval.ease_max_items=500", "retrieval.als_factors=8",
                       "retrieval.als_regularization=2", "retrieval.als_iterations=3",
                       "retrieval.sequence_weight=0.4", "retrieval.sequence_window=4", "retrieval.sequence_last=5",
                       "retrieval.sequence_decay=0.9"])
    assert old == load_config(["retrieval.ease.regularization=75", "retrieval.ease.max_items=500",
                               "retrieval.als.factors=8", "retrieval.als.regularization=2",
                               "retrieval.als.iterations=3", "retrieval.sequence.weight=0.4",
                               "retrieval.sequence.window=4", "retrieval.sequence.last=5",
                               "retrieval.sequence.decay=0.9"])
    (conf_copy / "presets" / "old.yaml").write_text("retrieval:\n  ease_lambda: 100.0\n  sequence_weight: 0.7\n")
    preset = load_config(conf_dir=conf_copy, preset="old").retrieval
    assert (preset.ease.regularization, preset.sequence.weight, preset.sequence.window) == (100.0, 0.7, 10)
    # A retrieval section as registered models saved it before sections (and before the sequence signal and
    # item-kNN existed): the new keys with the values that reproduce it.
    saved = {"retriever": "ease", "min_rating": 4.0, "recency_half_life": None, "recency_unit": "rank",
             "ease_lambda": 100.0, "ease_max_items": 8000, "als_factors": 64, "als_regularization": 10.0,
             "als_iterations": 15, "n_candidates": 100, "rating_weight": 0.25, "interaction_weight": 0.5,
             "choose_on_validation": True, "n_candidates_grid": [50], "rating_weight_grid": [0.0],
             "interaction_weight_grid": [0.0]}
    section = RetrievalConfig.model_validate(saved_section("retrieval", saved))
    assert (section.ease.regularization, section.ease.max_items, section.als.factors) == (100.0, 8000, 64)
    assert section.sequence.weight == 0.0 and section.profile_rating_offset is None
    with_sequence = RetrievalConfig.model_validate(saved_section("retrieval", saved | {
        "sequence_weight": 0.7, "sequence_window": 10, "sequence_last": 10, "sequence_decay": 0.7}))
    assert with_sequence.sequence.weight == 0.7


def test_a_tuning_space_searches_a_retrievers_keys():
    config = load_config(["tune.space={retrieval: {ease.regularization: {loguniform: [10, 1000]}}}"])
    assert "retrieval.ease.regularization" in config.tune.searched_keys()
    with pytest.raises(ConfigError, match=r"tune.space.retrieval.ease.lamda is not"):
        load_config(["tune.space={retrieval: {ease.lamda: {loguniform: [10, 1000]}}}"])


def test_dataset_by_name():
    data = load_config(["data.name=ml-1m"]).data
    assert data.published.url.endswith("/ml-1m.zip") and data.published.sizes.ratings == 1_000_209
    with pytest.raises(ConfigError, match=r"data.name 'ml-5m' is none of data.datasets: ml-latest-small, ml-100k"):
        load_config(["data.name=ml-5m"])


def test_fold_protocol_needs_a_dataset_with_that_fold():
    split = load_config(["data.name=ml-100k", "data.split.protocol=fold", "data.split.fold=ua"]).data.split
    assert (split.protocol, split.fold) == ("fold", "ua")
    with pytest.raises(ConfigError, match=r"data.split.protocol fold: ml-latest-small ships no folds "
                                          r"\(datasets with folds: ml-100k\)"):
        load_config(["data.split.protocol=fold"])
    with pytest.raises(ConfigError, match=r"data.split.fold 'u6' is not a fold of ml-100k: u1, u2, u3, u4, u5, ua, ub"):
        load_config(["data.name=ml-100k", "data.split.protocol=fold", "data.split.fold=u6"])


def test_unknown_key_in_yaml_file_is_named(conf_copy: Path):
    path = conf_copy / "model.yaml"
    path.write_text(path.read_text() + "\nembeding_size: 12\n")
    with pytest.raises(ConfigError, match=r"model\.embeding_size: unknown key"):
        load_config(conf_dir=conf_copy)


def test_missing_key_in_yaml_file_is_named(conf_copy: Path):
    path = conf_copy / "train.yaml"
    tree = yaml.safe_load(path.read_text())
    del tree["patience"]
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"train\.patience: missing key"):
        load_config(conf_dir=conf_copy)


def test_missing_yaml_file_is_named(conf_copy: Path):
    (conf_copy / "train.yaml").unlink()
    with pytest.raises(ConfigError, match="train.yaml"):
        load_config(conf_dir=conf_copy)


def test_conf_dir_copy_loads_like_defaults(conf_copy: Path):
    assert load_config(conf_dir=conf_copy) == load_config()


def test_dropouts_must_match_hidden_dims():
    with pytest.raises(ConfigError, match=r"dropouts has 4 entries but model\.hidden_dims has 2"):
        load_config(["model.hidden_dims=[32, 16]"])


def test_dropout_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="dropouts"):
        load_config(["model.hidden_dims=[8]", "model.dropouts=[1.0]"])


def test_save_config_round_trips(tmp_path: Path):
    config = load_config(["model.embedding_dim=32", "train.max_epochs=7", "model.use_genres=true"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert isinstance(again, Config)
    assert again == config
    assert again.model.embedding_dim == 32 and again.train.max_epochs == 7


@pytest.mark.parametrize("section, key, value", [("data", "dir", "/elsewhere"), ("retrieval", "n_candidates", 7),
                                                ("train", "checkpoint_dir", "/tmp/x")])
def test_a_loaded_config_is_read_only(section: str, key: str, value: object):
    """Paths and choices a run makes travel as arguments or artifacts: assigning into the config raises, and
    `with_values` builds a validated copy instead, leaving the original as it was."""
    config = load_config()
    before = getattr(getattr(config, section), key)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(getattr(config, section), key, value)
    with pytest.raises(ValidationError, match="frozen"):
        config.preset = "neumf"
    assert getattr(getattr(with_values(config, {f"{section}.{key}": value}), section), key) == value
    assert getattr(getattr(config, section), key) == before


def test_flatten_gives_dotted_keys():
    flat = flatten(load_config(["model.embedding_dim=32"]))
    assert flat["model.embedding_dim"] == 32
    assert flat["data.split.protocol"] == "seed"
    assert flat["train.batch_size"] == 4096
    assert flat["model.hidden_dims"] == [512, 256, 128, 64]
    assert not any(isinstance(v, dict) for v in flat.values())
    assert {key.split(".")[0] for key in flat} == {*SECTIONS, "preset"}
    assert flat["preset"] == "deck"


def test_presets_apply_over_the_defaults():
    deck = load_config(preset="deck")
    assert deck == load_config().model_copy(update={"preset": "deck"})
    neumf = load_config(["train.batch_size=64"], preset="neumf")
    assert neumf.preset == "neumf"
    assert (neumf.model.architecture, neumf.model.objective, neumf.model.attention) == ("neumf", "implicit", False)
    assert neumf.retrieval.retriever == "none" and neumf.train.monitor == "val_full_ndcg_at_10"
    assert neumf.train.batch_size == 64  # overrides come after the preset
    assert neumf.data == deck.data  # what the preset does not name keeps its default
    recommender = load_config(preset="recommender")
    assert recommender.registry.champion_metric == "val_full_ndcg_at_10"


def test_a_preset_extends_another():
    """The history preset starts from the recommender preset's values and changes only the retrieval it names."""
    history, recommender = load_config(preset="history"), load_config(preset="recommender")
    assert history.preset == "history" and history.retrieval.retriever == "history"
    assert (history.model, history.train) == (recommender.model, recommender.train)
    assert history.retrieval.profile_rating_offset == recommender.retrieval.profile_rating_offset == 2.0
    assert history.retrieval.sequence.window == recommender.retrieval.sequence.window
    # Its sweep searches the NCF's space over this retriever, fitted once per sweep: no trial changes retrieval.
    assert history.tune.space == recommender.tune.space and "retrieval" not in history.tune.space


def test_presets_that_extend_each_other_are_refused(conf_copy: Path):
    (conf_copy / "presets" / "a.yaml").write_text("extends: b\n")
    (conf_copy / "presets" / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match="extends 'a', which extends it back"):
        load_config(conf_dir=conf_copy, preset="a")
    (conf_copy / "presets" / "c.yaml").write_text("extends: nope\n")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(conf_dir=conf_copy, preset="c")


def test_unknown_preset_and_preset_keys_are_named(conf_copy: Path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*deck, history, neumf, recommender, tiny"):
        load_config(preset="nope")
    (conf_copy / "presets" / "broken.yaml").write_text("model:\n  embeding_dim: 8\n")
    with pytest.raises(ConfigError, match="model.embeding_dim"):
        load_config(conf_dir=conf_copy, preset="broken")


def test_implicit_models_cannot_monitor_rmse():
    with pytest.raises(ConfigError, match="val_rmse needs a rating head"):
        load_config(["model.objective=implicit"])
    assert load_config(["model.objective=implicit", "train.monitor=val_full_ndcg_at_10"]).model.objective == "implicit"


def test_evaluation_defaults_rank_every_user_locally():
    evaluation = load_config().evaluation
    assert evaluation.users is None and evaluation.runner == "local"
    assert (evaluation.actors, evaluation.users_per_block, evaluation.cpus_per_actor) == (2, 2048, 1)
    flat = flatten(load_config(["evaluation.users=5000"]))  # what MLflow logs as params
    assert flat["evaluation.users"] == 5000 and flat["evaluation.runner"] == "local"


@pytest.mark.parametrize("override, key", [("evaluation.users=0", "evaluation.users"),
                                           ("evaluation.users=-3", "evaluation.users"),
                                           ("evaluation.actors=0", "evaluation.actors"),
                                           ("evaluation.users_per_block=0", "evaluation.users_per_block"),
                                           ("evaluation.cpus_per_actor=0", "evaluation.cpus_per_actor"),
                                           ("evaluation.runner=spark", "evaluation.runner")])
def test_invalid_evaluation_values_name_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=rf"{key}: "):
        load_config([override])


def test_relevance_thresholds_are_config_keys_that_older_saved_configs_complete():
    """Full ranking's relevance (also what /explain counts as liked) and the deck protocol's come from
    conf/evaluation.yaml; a config saved before the keys existed reads the values used then."""
    evaluation = load_config().evaluation
    assert (evaluation.relevant_rating, evaluation.seed_relevant_rating) == (4.0, 3.0)
    assert saved_section("evaluation", {}) == {"relevant_rating": 4.0, "seed_relevant_rating": 3.0}
    assert saved_section("evaluation", {"relevant_rating": 4.5})["relevant_rating"] == 4.5


def test_the_live_ratings_store_is_a_database_url():
    """`feedback.uri` (conf/feedback.yaml): an embedded SQLite file by default, any SQLAlchemy URL by override;
    a value that is no database URL is refused with the key's name."""
    assert load_config().feedback.uri == "sqlite:///feedback/ratings.db"
    postgres = "postgresql+psycopg://ncf@127.0.0.1:5432/ncf_feedback"
    assert load_config([f"feedback.uri={postgres}"]).feedback.uri == postgres
    with pytest.raises(ConfigError, match=r"feedback\.uri: .*'ratings\.db' is not a database URL"):
        load_config(["feedback.uri=ratings.db"])
