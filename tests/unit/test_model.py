"""The NCF model: attention gates, output scaling, the fast catalogue scorer, init, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ncf.config import ModelConfig, load_config
from ncf.data import Ratings
from ncf.model import NCF, UniformDropout, UserSide, count_flops_per_sample, forward_batched

N_USERS, N_MOVIES, N_GENRES = 9, 23, 5


def model_config(*overrides: str) -> ModelConfig:
    # Any objective: the full-ranking monitor is valid for every head (val_rmse needs a rating head).
    return load_config(["train.monitor=val_full_ndcg_at_10", *overrides]).model


def small_config(*overrides: str) -> ModelConfig:
    return model_config("model.embedding_dim=8", "model.hidden_dims=[16, 8, 4]", "model.dropouts=[0.3, 0.1, 0.0]",
                        *overrides)


def genres() -> torch.Tensor:
    return (torch.rand(N_MOVIES, N_GENRES, generator=torch.Generator().manual_seed(1)) < 0.4).float()


def scramble_batch_norm_and_biases(model: NCF) -> None:
    """Non-trivial running statistics, affine parameters and biases, as after training."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g))
                module.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                module.weight.copy_(torch.randn(n, generator=g))
                module.bias.copy_(torch.randn(n, generator=g))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.5)
        if model.cfg.use_bias:
            model.user_bias.weight.copy_(torch.randn(N_USERS, 1, generator=g))
            model.movie_bias.weight.copy_(torch.randn(N_MOVIES, 1, generator=g))


def random_ratings(seed: int = 5) -> Ratings:
    """About a third of all (user, movie) pairs rated, at random times and ratings; user 0 rates nothing."""
    rng = np.random.default_rng(seed)
    users, movies = (t.numpy() for t in all_pairs())
    rated = (rng.random(len(users)) < 0.35) & (users > 0)
    n = int(rated.sum())
    return Ratings(users[rated], movies[rated], rng.integers(1, 11, n) / 2, rng.permutation(n).astype(np.int64))


def trained_looking_model(*overrides: str) -> NCF:
    """A small model in eval mode, with the scrambled statistics and biases of `scramble_batch_norm_and_biases`;
    a history model remembers `random_ratings` and has learnt attention logits."""
    torch.manual_seed(0)
    cfg = small_config(*overrides)
    model = NCF(N_USERS, N_MOVIES, cfg, genres() if cfg.use_genres else None)
    scramble_batch_norm_and_biases(model)
    if model.reads_history:
        model.remember(random_ratings())
        with torch.no_grad():
            model.history.rating_logit.copy_(torch.linspace(-1, 1, len(model.history.rating_logit)))
            model.history.age_slope.fill_(-0.5)
    return model.eval()


def all_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    users = torch.arange(N_USERS).repeat_interleave(N_MOVIES)
    movies = torch.arange(N_MOVIES).repeat(N_USERS)
    return users, movies


def test_attention_weights_are_a_distribution():
    torch.manual_seed(0)
    model = NCF(N_USERS, N_MOVIES, model_config()).eval()  # the deck's architecture
    with torch.no_grad():
        model.attention.weight.mul_(20)  # sharpen the gates so they move away from 1/2
        out = model(*all_pairs())
    total = out.user_weight + out.movie_weight
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    for weight in (out.user_weight, out.movie_weight):
        assert ((weight > 0) & (weight < 1)).all()
    assert out.user_weight.std() > 0.01  # the gates depend on the pair


def test_rating_is_strength_scaled_to_the_rating_range():
    torch.manual_seed(0)
    model = NCF(N_USERS, N_MOVIES, small_config())
    scramble_batch_norm_and_biases(model)
    out = model.eval()(*all_pairs())
    assert ((out.strength >= 0) & (out.strength <= 1)).all()
    assert torch.allclose(out.rating, 0.5 + 4.5 * out.strength, atol=1e-6)
    assert ((out.rating >= 0.5) & (out.rating <= 5.0)).all()
    assert out.rating.shape == (N_USERS * N_MOVIES,)
    assert out.strength.std() > 1e-3


ARCHITECTURES = [(f"model.architecture={arch}", f"model.objective={objective}", f"model.attention={attention}")
                 for arch in ("mlp", "gmf", "neumf", "history") for objective in ("rating", "implicit", "joint")
                 for attention in ("true", "false")]


@pytest.mark.parametrize("options", [(), ("model.use_bias=true",), ("model.use_genres=true",),
                                     ("model.use_bias=true", "model.use_genres=true"),
                                     ("model.batch_norm=false", "model.use_bias=true"), *ARCHITECTURES,
                                     ("model.architecture=neumf", "model.objective=joint", "model.use_bias=true",
                                      "model.use_genres=true")])
def test_score_users_equals_forward_on_the_grid(options):
    """The fast catalogue scorer gives the eval-mode forward's ranking logit for every architecture and head."""
    model = trained_looking_model(*options)
    with torch.no_grad():
        expected = model(*all_pairs()).logit.view(N_USERS, N_MOVIES)
    users = torch.arange(N_USERS)
    got = model.score_users(users)
    assert got.shape == (N_USERS, N_MOVIES)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # A subset of users and movies, in any order.
    some_users, some_movies = torch.tensor([4, 0, 8]), torch.tensor([22, 3, 3, 10])
    assert torch.allclose(model.score_users(some_users, some_movies), expected[some_users][:, some_movies],
                          atol=1e-5)
    # The movie side computed once and reused (as the server does) gives the same scores.
    side = model.movie_side(some_movies)
    assert torch.equal(model.score_users(some_users, movie_side=side), model.score_users(some_users, some_movies))
    assert torch.allclose(model.score_users(users, movie_side=model.movie_side()), expected, atol=1e-5)


@pytest.mark.parametrize("options", [(), ("model.use_bias=true", "model.use_genres=true"),
                                     ("model.batch_norm=false",), *ARCHITECTURES])
def test_infer_equals_forward_on_pairs(options):
    """The fast pair scorer gives every output of the eval-mode forward, pairs in any order and repeated."""
    model = trained_looking_model(*options)
    g = torch.Generator().manual_seed(3)
    users, movies = all_pairs()
    order = torch.randint(0, len(users), (3 * len(users),), generator=g)
    for pairs in (all_pairs(), (users[order], movies[order]), (torch.tensor([5]), torch.tensor([17]))):
        with torch.no_grad():
            expected = model(*pairs)
        # The movie side computed per call, once for the whole catalogue, and by the batched pass: per batch of 7
        # (more distinct movies than that), once for batches of 40.
        for got in (model.infer(*pairs), model.infer(*pairs, model.movie_side()),
                    forward_batched(model, *pairs, batch_size=7), forward_batched(model, *pairs, batch_size=40)):
            for name, value in got._asdict().items():
                assert value.shape == pairs[0].shape, name
                assert torch.allclose(value, getattr(expected, name), atol=1e-5), (name, options)


def test_xavier_init_and_zero_biases():
    torch.manual_seed(0)
    model = NCF(300, 400, model_config("model.use_bias=true", "model.use_genres=true"),
                torch.ones(400, N_GENRES))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embeddings = [model.user_embedding, model.movie_embedding]
    assert len(linears) == 1 + 5 + 1  # attention, 4 hidden + rating head, genre projection
    for module in linears + embeddings:
        fan_out, fan_in = module.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight = module.weight.detach()
        assert weight.abs().max() <= bound + 1e-7
        if weight.numel() >= 1000:  # a uniform on [-bound, bound] has std bound / sqrt(3)
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
    assert torch.count_nonzero(model.user_bias.weight) == 0
    assert torch.count_nonzero(model.movie_bias.weight) == 0


def test_reset_parameters_gives_a_fresh_model():
    """Refitting resets the model in place: nothing learnt (batch norm included) may survive."""
    torch.manual_seed(0)
    model = NCF(N_USERS, N_MOVIES, small_config("model.use_bias=true"))
    scramble_batch_norm_and_biases(model)
    with torch.no_grad():
        model.user_embedding.weight.fill_(3.0)
    model.reset_parameters()
    assert model.user_embedding.weight.abs().max() < 3.0
    assert torch.count_nonzero(model.user_bias.weight) == 0
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(batch_norms) == 3
    for bn in batch_norms:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0


def test_options_are_off_by_default():
    model = NCF(N_USERS, N_MOVIES, model_config())
    assert not hasattr(model, "user_bias") and not hasattr(model, "movie_bias")
    assert not hasattr(model, "genre_projection") and not hasattr(model, "genres")
    names = {name for name, _ in model.named_parameters()}
    assert not any("bias" in name.split(".")[0] for name in names)
    hidden = [m.out_features for m in model.mlp if isinstance(m, nn.Linear)]
    assert hidden == [512, 256, 128, 64]
    assert model.rating_head.in_features == 64 and model.rating_head.out_features == 1
    assert not hasattr(model, "interaction_head") and model.heads == ("rating",)
    assert model.mlp[0].in_features == 2 * 128
    dropouts = [m.p for m in model.mlp if isinstance(m, nn.Dropout)]
    assert dropouts == [0.3, 0.2, 0.1]  # the 0.0 dropout adds no layer
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.mlp) == 4


def test_options_add_their_parameters():
    cfg = small_config("model.use_bias=true", "model.use_genres=true")
    model = NCF(N_USERS, N_MOVIES, cfg, genres())
    assert model.user_bias.weight.shape == (N_USERS, 1)
    assert model.movie_bias.weight.shape == (N_MOVIES, 1)
    assert model.genre_projection.weight.shape == (8, N_GENRES)
    assert "genres" in dict(model.named_buffers())


def test_sparse_embeddings_change_only_how_gradients_are_stored():
    """Same init, same outputs; the tables' gradients hold only the rows the batch touched."""
    options = ("model.use_bias=true",)
    torch.manual_seed(0)
    dense = NCF(N_USERS, N_MOVIES, small_config(*options, "model.sparse_embeddings=false")).eval()
    torch.manual_seed(0)
    sparse = NCF(N_USERS, N_MOVIES, small_config(*options, "model.sparse_embeddings=true")).eval()
    assert dense.state_dict().keys() == sparse.state_dict().keys()
    for name, value in dense.state_dict().items():
        assert torch.equal(value, sparse.state_dict()[name]), name
    users, movies = torch.tensor([1, 4, 4]), torch.tensor([0, 7, 22])
    for model in (dense, sparse):
        model(users, movies).rating.sum().backward()
    for table in ("user_embedding", "movie_embedding", "user_bias", "movie_bias"):
        grad = getattr(sparse, table).weight.grad
        assert grad.is_sparse
        assert set(grad.coalesce().indices()[0].tolist()) == set((users if "user" in table else movies).tolist())
        assert torch.allclose(grad.to_dense(), getattr(dense, table).weight.grad, atol=1e-6)
    assert not sparse.mlp[0].weight.grad.is_sparse


def test_uniform_dropout_is_dropout():
    """Drops a fraction p, scales the rest by 1/(1-p) (the mean is kept), passes gradients through the mask
    only, and is the identity in eval mode."""
    torch.manual_seed(0)
    dropout = UniformDropout(0.3)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert 1 - kept.float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert torch.equal(dropout.eval()(x), x)
    # torch.manual_seed fixes the masks; another seed draws others.
    masks = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        masks.append(UniformDropout(0.3)(torch.ones(1000)) != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_use_genres_requires_the_genre_matrix():
    with pytest.raises(ValueError, match="genre"):
        NCF(N_USERS, N_MOVIES, small_config("model.use_genres=true"))


def test_genres_change_the_movie_vectors():
    torch.manual_seed(0)
    model = NCF(N_USERS, N_MOVIES, small_config("model.use_genres=true"), genres())
    movies = torch.arange(N_MOVIES)
    with torch.no_grad():
        expected = model.movie_embedding(movies) + genres() @ model.genre_projection.weight.T
        assert torch.allclose(model.movie_vectors(movies), expected, atol=1e-6)


def test_flops_per_sample_by_hand():
    cfg = model_config("model.embedding_dim=8", "model.hidden_dims=[16, 8]", "model.dropouts=[0.0, 0.0]")
    # attention 16x2, layers 16x16 and 16x8, output 8x1 multiply-adds; two flops each.
    assert count_flops_per_sample(cfg) == 2 * (16 * 2 + 16 * 16 + 16 * 8 + 8)


def test_each_architecture_reads_its_paths():
    """mlp: the MLP's last layer; gmf: the embedding product (embedding_dim wide); neumf: both, concatenated."""
    widths = {"mlp": 4, "gmf": 8, "neumf": 4 + 8}
    for arch, width in widths.items():
        model = NCF(N_USERS, N_MOVIES, small_config(f"model.architecture={arch}", "model.objective=joint"))
        assert model.rating_head.in_features == width and model.interaction_head.in_features == width
        assert hasattr(model, "mlp") == (arch != "gmf")
        assert model.heads == ("rating", "interaction")


def test_without_attention_both_weights_are_a_half():
    torch.manual_seed(0)
    model = NCF(N_USERS, N_MOVIES, small_config("model.attention=false", "model.architecture=neumf")).eval()
    assert not hasattr(model, "attention")
    out = model(*all_pairs())
    assert torch.equal(out.user_weight, torch.full_like(out.user_weight, 0.5))
    assert torch.equal(out.movie_weight, out.user_weight)


def test_gmf_is_the_gated_product_under_the_head():
    """GMF by hand: head(2 w_u u * 2 w_m m)."""
    torch.manual_seed(0)
    model = NCF(N_USERS, N_MOVIES, small_config("model.architecture=gmf", "model.objective=implicit")).eval()
    users, movies = all_pairs()
    with torch.no_grad():
        out = model(users, movies)
        u, m = model.user_embedding(users), model.movie_embedding(movies)
        product = (2 * out.user_weight[:, None] * u) * (2 * out.movie_weight[:, None] * m)
        expected = product @ model.interaction_head.weight[0] + model.interaction_head.bias
    assert torch.allclose(out.logit, expected, atol=1e-6)


def test_what_each_objective_shows():
    """rating: strength is the rating head's sigmoid; implicit: no rating head, the 'rating' is the strength on
    the rating scale; joint: the rating from the rating head, the strength from the interaction head."""
    torch.manual_seed(0)
    pairs = all_pairs()
    for objective in ("rating", "implicit", "joint"):
        model = NCF(N_USERS, N_MOVIES, small_config(f"model.objective={objective}"))
        scramble_batch_norm_and_biases(model)
        out = model.eval()(*pairs)
        assert torch.allclose(out.strength, torch.sigmoid(out.logit))
        if objective == "joint":
            assert not torch.allclose(out.rating, 0.5 + 4.5 * out.strength, atol=1e-3)
        else:
            assert torch.allclose(out.rating, 0.5 + 4.5 * out.strength, atol=1e-6)


def test_flops_of_the_paper_architectures():
    cfg = model_config("model.embedding_dim=8", "model.hidden_dims=[16, 8]", "model.dropouts=[0.0, 0.0]",
                       "model.architecture=neumf", "model.attention=false", "model.objective=joint")
    # no attention; MLP 16x16 and 16x8; GMF product 8; two heads over 8 + 8.
    assert count_flops_per_sample(cfg) == 2 * (16 * 16 + 16 * 8 + 8 + 2 * 16)


def random_user_side(model: NCF, n: int) -> UserSide:
    """Vectors of `n` users the model never saw (a fold-in's output)."""
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(n, generator=g) if model.cfg.use_bias else None
    return UserSide(torch.randn(n, model.cfg.embedding_dim, generator=g) * 0.3, bias)


@pytest.mark.parametrize("options", [(), ("model.use_bias=true", "model.use_genres=true"), *ARCHITECTURES])
def test_the_model_reads_a_given_user_side_as_its_embeddings(options):
    """`forward_user_side` with the looked-up vectors is `forward` bit for bit, pair rows or one row per pair; the
    fast scorers from a user side (`score_user_side`, `infer` and `forward_batched` with `user_side`) give the
    forward's outputs for vectors of users the model never saw."""
    model = trained_looking_model(*options)
    users, movies = all_pairs()
    with torch.no_grad():
        expected = model(users, movies)
        for got in (model.forward_user_side(model.user_side(users), movies),
                    model.forward_user_side(model.user_side(torch.arange(N_USERS)), movies, users)):
            for name, value in got._asdict().items():
                assert torch.equal(value, getattr(expected, name)), name
        side = random_user_side(model, 4)
        rows = torch.arange(4).repeat_interleave(N_MOVIES)
        new = model.forward_user_side(side, torch.arange(N_MOVIES).repeat(4), rows)
    assert torch.allclose(model.score_user_side(side), new.logit.view(4, N_MOVIES), atol=1e-5)
    for got in (model.infer(rows, torch.arange(N_MOVIES).repeat(4), user_side=side),
                forward_batched(model, rows, torch.arange(N_MOVIES).repeat(4), batch_size=7, user_side=side)):
        for name, value in got._asdict().items():
            assert torch.allclose(value, getattr(new, name), atol=1e-5), name
