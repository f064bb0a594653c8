"""The training loop in-process on the tiny synthetic dataset, evaluation and the baselines."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ncf.baselines import GlobalMean, MostPopular, UserItemBias
from ncf.config import Config, ConfigError, load_config
from ncf.data import MovieLens
from ncf.evaluation import TABLE_COLUMNS, RetrievalBaseline, evaluate, evaluate_baselines, format_table
from ncf.metrics import rmse
from ncf.model import forward_batched
from ncf.recommender import ModelAlone
from ncf.retrievers import RETRIEVERS
from ncf.training import loop as training_loop
from ncf.training.checkpoints import CHECKPOINT_FILE, model_from_checkpoint
from ncf.training.loop import train_loop, train_step
from ncf.training.optimizer import SparseDenseAdam, make_optimizer
from ncf.training.reporting import LocalReporter
from ncf.training.state import Phase, TrainResult, build_model
from ncf.training.validation import Validation

SAMPLED = {"sampled_hr_at_10", "sampled_ndcg_at_10"}  # the paper's protocol, asked for separately
SMALL_BATCHES = ("train.batch_size=128",)


def small_config(*overrides: str) -> Config:
    return load_config([*SMALL_BATCHES, *overrides], preset="tiny")


def search_entries(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [m for m in history if m["phase"] == Phase.SEARCH]


def refit_entries(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [m for m in history if m["phase"] == Phase.REFIT]


def validation_rmse(model, data: MovieLens) -> float:
    users, movies, ratings = data.splits.validation.tensors()
    return rmse(ratings.numpy(), forward_batched(model, users, movies).rating.numpy())


@pytest.fixture(scope="module")
def refit_run(tiny_movielens: MovieLens) -> tuple[TrainResult, LocalReporter]:
    """Three search epochs (no early stop possible), then the refit on train + validation."""
    reporter = LocalReporter(verbose=False)
    config = small_config("train.max_epochs=3", "train.patience=3", "train.refit=true")
    return train_loop(config, tiny_movielens, reporter, Validation(config, tiny_movielens, rank=0)), reporter


def test_search_phase_learns_and_tracks_validation(refit_run):
    result, reporter = refit_run
    search = search_entries(result.history)
    assert [m["epoch"] for m in search] == [1, 2, 3]
    assert search[-1]["train_loss"] < search[0]["train_loss"]
    assert search[1]["train_loss"] < search[0]["train_loss"]
    for m in search:
        assert math.isfinite(m["val_rmse"]) and 0 < m["val_rmse"] < 2
        assert m["val_rmse"] == pytest.approx(math.sqrt(m["val_loss"]))
        assert m["train_rmse"] == pytest.approx(math.sqrt(m["train_loss"]))
        assert 0 < m["val_mae"] < m["val_rmse"] + 1e-9
    val = [m["val_rmse"] for m in search]
    assert result.best_value == pytest.approx(min(val))
    assert result.best_epoch == int(np.argmin(val)) + 1
    assert search[-1]["best_val_rmse"] == pytest.approx(min(val))  # best_<train.monitor>
    assert search[0]["improved"] == 1.0
    assert reporter.history == result.history


def test_refit_runs_best_epoch_count_on_train_and_validation(refit_run):
    result, _ = refit_run
    search, refit = search_entries(result.history), refit_entries(result.history)
    assert 1 <= result.best_epoch <= 3
    assert len(result.history) == 3 + result.best_epoch
    assert len(refit) == result.best_epoch
    assert [m["epoch"] for m in refit] == list(range(4, 4 + result.best_epoch))
    assert [m["lr"] for m in refit] == [m["lr"] for m in search[: result.best_epoch]]
    for m in refit:
        assert "val_rmse" not in m  # validation is part of the refit data
        assert math.isfinite(m["train_loss"])
    assert not result.model.training
    assert next(result.model.parameters()).device.type == "cpu"


def test_refit_model_is_not_the_search_model(refit_run, tiny_movielens):
    """The refit model learnt from the validation ratings: it fits them better than the best search model did."""
    result, _ = refit_run
    assert validation_rmse(result.model, tiny_movielens) < result.best_value


def test_without_refit_the_best_weights_are_returned(tiny_movielens, tmp_path):
    config = small_config("train.max_epochs=3", "train.patience=3", "train.refit=false")
    reporter = LocalReporter(checkpoint_dir=tmp_path, verbose=False)
    result = train_loop(config, tiny_movielens, reporter, Validation(config, tiny_movielens, rank=0))
    assert len(result.history) == 3 and not refit_entries(result.history)
    assert validation_rmse(result.model, tiny_movielens) == pytest.approx(result.best_value, abs=1e-5)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    restored = model_from_checkpoint(tmp_path, config, tiny_movielens)  # no refit: the best weights
    assert not restored.training
    assert validation_rmse(restored, tiny_movielens) == pytest.approx(result.best_value, abs=1e-5)


def test_early_stopping_and_lr_plateau(tiny_movielens):
    # A high learning rate overfits 60 users within a couple of epochs.
    config = small_config("train.max_epochs=10", "train.patience=2", "train.refit=false",
                          "train.learning_rate=0.01", "train.lr_plateau_patience=0", "train.lr_plateau_factor=0.5")
    result = train_loop(config, tiny_movielens, LocalReporter(verbose=False),
                        Validation(config, tiny_movielens, rank=0))
    history = result.history
    assert len(history) < 10
    assert [m["improved"] for m in history[-2:]] == [0.0, 0.0]
    assert result.best_epoch == len(history) - 2
    first_stale = next(i for i, m in enumerate(history) if m["improved"] == 0.0)
    assert history[first_stale]["lr"] == pytest.approx(0.01)
    assert history[first_stale + 1]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_resume_continues_from_the_checkpoint(tiny_movielens, tmp_path, sparse):
    """No dropout, so the run is deterministic: stopping and resuming must change nothing (the optimizer's
    moments included: restarting them would change every later step)."""
    deterministic = ("model.dropouts=[0.0, 0.0]", "train.refit=false", "train.patience=4",
                     f"model.sparse_embeddings={str(sparse).lower()}")
    four, two = small_config("train.max_epochs=4", *deterministic), small_config("train.max_epochs=2", *deterministic)
    straight = train_loop(four, tiny_movielens, LocalReporter(verbose=False), Validation(four, tiny_movielens, rank=0))

    first = LocalReporter(checkpoint_dir=tmp_path, resume=False, verbose=False)
    head = train_loop(two, tiny_movielens, first, Validation(two, tiny_movielens, rank=0))
    assert [m["epoch"] for m in first.history] == [1, 2]
    assert (tmp_path / CHECKPOINT_FILE).is_file()

    second = LocalReporter(checkpoint_dir=tmp_path, resume=True, verbose=False)
    resumed = train_loop(four, tiny_movielens, second, Validation(four, tiny_movielens, rank=0))
    assert [m["epoch"] for m in second.history] == [3, 4]  # not re-trained from epoch 1
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[:2] == head.history
    for got, want in zip(resumed.history, straight.history, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_rmse"] == pytest.approx(want["val_rmse"], rel=1e-5)
    assert resumed.best_epoch == straight.best_epoch
    assert resumed.best_value == pytest.approx(straight.best_value, rel=1e-5)


def test_every_epoch_counts_its_samples_and_the_workers_memory(refit_run, tiny_movielens):
    sizes = {Phase.SEARCH: len(tiny_movielens.splits.train),
             Phase.REFIT: len(tiny_movielens.splits.train_and_validation())}
    for entry in refit_run[0].history:
        assert entry["train_samples"] == entry["worker/0/samples"] == sizes[entry["phase"]]
        assert 0.05 < entry["worker/0/peak_rss_gb"] < 64


def test_max_steps_per_epoch_caps_each_epoch(tiny_movielens):
    config = small_config("train.max_epochs=2", "train.patience=2", "train.refit=false",
                          "train.max_steps_per_epoch=3", "train.batch_size=16")
    assert len(tiny_movielens.splits.train) > 3 * 16
    history = train_loop(config, tiny_movielens, LocalReporter(verbose=False),
                         Validation(config, tiny_movielens, rank=0)).history
    assert [entry["train_samples"] for entry in history] == [3 * 16, 3 * 16]


def test_a_long_epoch_says_how_far_it_has_got(tiny_movielens, monkeypatch, capsys):
    monkeypatch.setattr(training_loop, "PROGRESS_SECONDS", 0.0)  # a line after every step
    config = small_config("train.max_epochs=1", "train.refit=false", "train.max_steps_per_epoch=3",
                          "train.batch_size=16")
    train_loop(config, tiny_movielens, LocalReporter(verbose=False), Validation(config, tiny_movielens, rank=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if "epoch in progress" in line]
    assert [line.split(":")[1].split(",")[:2] for line in lines] == [
        [f" {step} steps", f" {16 * step} samples on rank 0"] for step in (1, 2, 3)]


def test_max_steps_per_epoch_is_positive_or_null():
    with pytest.raises(ConfigError, match="max_steps_per_epoch"):
        small_config("train.max_steps_per_epoch=0")


def test_sparse_embeddings_train(tiny_movielens):
    config = small_config("model.sparse_embeddings=true", "train.max_epochs=4", "train.patience=4",
                          "train.refit=false", "train.weight_decay=1e-4")
    result = train_loop(config, tiny_movielens, LocalReporter(verbose=False),
                        Validation(config, tiny_movielens, rank=0))
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.history[-1]["val_rmse"] < result.history[0]["val_rmse"]



@pytest.mark.parametrize("bf16_on_cpu", [False, True])
def test_bf16_on_cpu_sets_the_precision_of_the_training_steps_only(tiny_movielens, bf16_on_cpu: bool):
    """train.bf16_on_cpu: the training steps' matrix products in bf16 on CPU (autocast), or fp32; the trained
    model is fp32 either way."""
    dtypes: set[torch.dtype] = set()  # of the linear layers' outputs in training mode

    def record(module: torch.nn.Module, _, output) -> None:
        if isinstance(module, torch.nn.Linear) and module.training:
            dtypes.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        config = small_config("train.max_epochs=3", "train.patience=3", "train.refit=false",
                              f"train.bf16_on_cpu={str(bf16_on_cpu).lower()}")
        result = train_loop(config, tiny_movielens, LocalReporter(verbose=False),
                            Validation(config, tiny_movielens, rank=0))
    finally:
        hook.remove()
    assert dtypes == {torch.bfloat16 if bf16_on_cpu else torch.float32}
    assert result.history[-1]["val_rmse"] < result.history[0]["val_rmse"]
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}

def a_sparse_step(config, data, seed: int = 0):
    """A fresh sparse-embedding model and its optimizer after one step on 32 random training pairs."""
    torch.manual_seed(seed)
    model = build_model(config, data)
    optimizer = make_optimizer(model, config.train)
    users, movies, ratings = (t[:32] for t in data.splits.train.tensors())
    train_step(model, optimizer, users, movies, ratings, None, config)
    return model, optimizer, (users, movies, ratings)


def test_sparse_step_moves_only_the_rows_of_the_batch(tiny_movielens):
    config = small_config("model.sparse_embeddings=true", "train.weight_decay=1e-2")
    torch.manual_seed(0)
    before = build_model(config, tiny_movielens).user_embedding.weight.detach().clone()
    model, optimizer, (users, _, _) = a_sparse_step(config, tiny_movielens)
    assert isinstance(optimizer, SparseDenseAdam)
    moved = (model.user_embedding.weight.detach() != before).any(dim=1).nonzero().flatten()
    assert set(moved.tolist()) == set(users.tolist())


def test_sparse_optimizer_state_and_lr_survive_a_checkpoint(tiny_movielens):
    """What the checkpoint saves of SparseDenseAdam restores it exactly: the next step is the same;
    the plateau scheduler's lr reaches both the dense and the sparse parameters."""
    config = small_config("model.sparse_embeddings=true")
    model, optimizer, batch = a_sparse_step(config, tiny_movielens)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    scheduler.step(1.0)
    scheduler.step(2.0)  # no improvement: lr halves
    assert {group["lr"] for group in optimizer.sparse.param_groups + optimizer.dense.param_groups} == {
        config.train.learning_rate / 2}
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    restored, fresh_optimizer, _ = a_sparse_step(config, tiny_movielens, seed=1)  # other weights, other moments
    restored.load_state_dict(saved_model)
    fresh_optimizer.load_state_dict(saved_optimizer)
    assert fresh_optimizer.param_groups[-1]["lr"] == config.train.learning_rate / 2
    for m, opt in ((model, optimizer), (restored, fresh_optimizer)):
        torch.manual_seed(5)  # the same dropout masks
        train_step(m, opt, *batch, None, config)
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    with pytest.raises(ValueError, match="sparse_embeddings"):
        dense = small_config("model.sparse_embeddings=false")
        fresh_optimizer.load_state_dict(make_optimizer(build_model(dense, tiny_movielens), dense.train).state_dict())


def test_sparse_embeddings_refuse_nccl_data_parallel():
    with pytest.raises(ConfigError, match="NCCL"):
        small_config("model.sparse_embeddings=true", "train.use_gpu=true", "train.num_workers=2")


def test_resume_false_ignores_an_existing_checkpoint(tiny_movielens, tmp_path):
    config = small_config("train.max_epochs=1", "train.refit=false")
    train_loop(config, tiny_movielens, LocalReporter(checkpoint_dir=tmp_path, verbose=False),
               Validation(config, tiny_movielens, rank=0))
    again = LocalReporter(checkpoint_dir=tmp_path, resume=False, verbose=False)
    train_loop(config, tiny_movielens, again, Validation(config, tiny_movielens, rank=0))
    assert [m["epoch"] for m in again.history] == [1]


def test_resuming_a_finished_refit_does_no_more_work(tiny_movielens, tmp_path):
    config = small_config("train.max_epochs=2", "train.patience=2", "train.refit=true")
    done = train_loop(config, tiny_movielens, LocalReporter(checkpoint_dir=tmp_path, verbose=False),
                      Validation(config, tiny_movielens, rank=0))
    assert refit_entries(done.history)
    second = LocalReporter(checkpoint_dir=tmp_path, resume=True, verbose=False)
    again = train_loop(config, tiny_movielens, second, Validation(config, tiny_movielens, rank=0))
    assert second.history == []
    assert again.history == done.history
    users, movies, _ = tiny_movielens.splits.test.tensors()
    expected = forward_batched(done.model, users, movies).rating
    assert torch.allclose(forward_batched(again.model, users, movies).rating, expected)
    restored = model_from_checkpoint(tmp_path, config, tiny_movielens)  # after a refit: the refit weights
    assert torch.allclose(forward_batched(restored, users, movies).rating, expected)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_a_trained_model(refit_run, tiny_movielens):
    result, _ = refit_run
    scorer = ModelAlone(result.model)
    metrics = evaluate(scorer, tiny_movielens, evaluation=load_config().evaluation)
    assert set(metrics) == set(TABLE_COLUMNS) - SAMPLED
    assert 0.5 < metrics["rmse"] < 1.5
    assert 0 < metrics["mae"] < metrics["rmse"]
    for key in set(metrics) - {"rmse", "mae", "full_users"}:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["full_users"] == len(np.unique(tiny_movielens.splits.test.user[
        tiny_movielens.splits.test.rating >= 4]))  # every user with a relevant test movie
    assert metrics["precision_at_10"] > 0.5  # most test ratings are >= 3
    explained = scorer.explain(np.array([0, 1, 2]), np.array([5, 6, 7]))
    assert set(explained) == {"rating", "strength", "user_weight", "movie_weight", "logit"}
    np.testing.assert_allclose(explained["user_weight"] + explained["movie_weight"], 1.0, atol=1e-6)


def test_baseline_metric_keys(tiny_movielens):
    table = evaluate_baselines(tiny_movielens, evaluation=load_config().evaluation)
    assert list(table) == [GlobalMean.name, UserItemBias.name, MostPopular.name]
    rating_keys = {"rmse", "mae", "precision_at_10", "recall_at_10", "f_at_10", "ndcg_at_10"}
    full_keys = set(TABLE_COLUMNS) - rating_keys - SAMPLED
    assert set(table["global_mean"]) == rating_keys
    assert set(table["user_item_bias"]) == set(TABLE_COLUMNS) - SAMPLED
    assert set(table["most_popular"]) == full_keys
    assert table["user_item_bias"]["rmse"] < table["global_mean"]["rmse"]
    text = format_table(table)
    assert text.splitlines()[0].startswith("model")
    assert len(text.splitlines()) == 4
    assert "-" in text.splitlines()[3]  # most_popular has no RMSE


def test_a_retrieval_baseline_ranks_whom_it_cannot_score_by_popularity_as_served(tiny_movielens):
    """A retriever row ranks a user with no liked movie in the fit by the most rated movies, as the served stage
    does, not by nothing (under one global time cut most test users would go unranked); the others by the
    retriever."""
    fit_on = tiny_movielens.splits.train_and_validation()
    liked_only_5 = load_config(["retrieval.min_rating=5.0", "retrieval.profile_rating_offset=null"]).retrieval
    baseline = RetrievalBaseline("ease", liked_only_5).fit(fit_on, tiny_movielens.n_users, tiny_movielens.n_movies)
    has_a_5 = np.zeros(tiny_movielens.n_users, dtype=bool)
    has_a_5[fit_on.user[fit_on.rating >= 5.0]] = True
    without, with_one = int(np.flatnonzero(~has_a_5)[0]), int(np.flatnonzero(has_a_5)[0])
    popularity = np.bincount(fit_on.movie, minlength=tiny_movielens.n_movies)
    scores = baseline.score(np.array([without, with_one]))
    assert np.isfinite(scores[0]).all()
    np.testing.assert_array_equal(np.argsort(-scores[0], kind="stable")[:10],
                                  np.argsort(-popularity, kind="stable")[:10])
    assert not np.array_equal(np.argsort(-scores[1], kind="stable")[:10], np.argsort(-popularity, kind="stable")[:10])


def test_retrieval_baselines_sit_next_to_most_popular(tiny_movielens):
    """Every registered retriever (the configured settings) is a full-ranking row of the baseline table; the
    history model, whose fit takes minutes, only where it is the served retriever."""
    table = evaluate_baselines(tiny_movielens, evaluation=load_config().evaluation,
                               retrieval=load_config().retrieval)
    assert list(RETRIEVERS) == ["ease", "als", "itemknn", "history"]
    assert list(table)[-3:] == ["ease", "als", "itemknn"]
    served = load_config(["retrieval.retriever=history", "retrieval.history.epochs=2"]).retrieval
    assert list(evaluate_baselines(tiny_movielens, evaluation=load_config().evaluation, retrieval=served))[-4:] == list(
        RETRIEVERS)
    for name in ["ease", "als", "itemknn"]:
        assert set(table[name]) == set(TABLE_COLUMNS) - SAMPLED - {"rmse", "mae", "precision_at_10", "recall_at_10",
                                                                     "f_at_10", "ndcg_at_10"}
        assert 0 < table[name]["full_ndcg_at_10"] <= 1
