"""The NCF models: the deck's attention MLP and the NCF paper's GMF and NeuMF, one class.

user id -> embedding u, movie id -> embedding m (plus a genre projection when
enabled). An attention layer reads [u; m] and gives two weights (user, movie)
that sum to 1; the paths see 2 w_u u and 2 w_m m, so equal weights leave the
inputs unchanged and the weights say how much each side drives the prediction
(`model.attention: false` fixes them at 1/2: the paper's models).

The paths (`model.architecture`): `mlp`, the deck's MLP over [2 w_u u; 2 w_m m];
`gmf`, the element-wise product (2 w_u u) * (2 w_m m) (He et al. 2017); `neumf`,
both, their outputs concatenated; `history`, the deck's MLP with a user side that
also reads the user's own latest ratings (`ncf.history_encoder`: u is the id's
embedding plus the attention-pooled movies they rated before the predicted rating).
Heads read the paths' output (`model.objective`):
`rating`, a rating head, sigmoid scaled to [rating_min, rating_max] (the deck);
`implicit`, an interaction head whose logit says how likely the user is to watch
the movie (trained with binary cross-entropy against sampled unrated movies);
`joint`, both heads on the shared embeddings and gate.

Every pair carries a predicted rating, a strength in [0, 1] and the two weights.
The strength is sigmoid of the ranking logit: the rating head's for `rating`, the
interaction head's otherwise. An `implicit` model has no rating head: its
"predicted rating" is the strength on the rating scale, not an estimate of a rating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ncf.config import ModelConfig
from ncf.data import Ratings
from ncf.history_encoder import HistoryEncoder


class ModelOutput(NamedTuple):
    """What the model says of each (user, movie) pair."""

    rating: torch.Tensor
    strength: torch.Tensor
    user_weight: torch.Tensor
    movie_weight: torch.Tensor
    logit: torch.Tensor  # the ranking logit: rating head for `rating` models, interaction head otherwise


class MovieSide(NamedTuple):
    """The movie halves of the attention logits (bias included) and of the first MLP layer, the
    eval-mode MLP layers with batch norm folded in, and the movie vectors the GMF path multiplies:
    the part of `NCF.score_users` no user changes."""

    movies: torch.Tensor
    attention: torch.Tensor | None  # movies x 2; None without the attention gate
    first: torch.Tensor | None  # movies x first hidden width; None without the MLP path
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    vectors: torch.Tensor  # movies x embedding_dim


@dataclass(frozen=True)
class UserSide:
    """What the model reads of each of P users: the embedding and, with `use_bias`, the bias. A known user's is
    looked up (`NCF.user_side`); a user folded in from ratings (`ncf.fold_in`) has vectors of its own."""

    embedding: torch.Tensor  # [P, embedding_dim]
    bias: torch.Tensor | None  # [P]; None without `use_bias`

    def __len__(self) -> int:
        return len(self.embedding)

    def take(self, rows) -> UserSide:
        """The users of `rows`, in that order."""
        rows = torch.as_tensor(rows)
        return UserSide(self.embedding[rows], None if self.bias is None else self.bias[rows])


HAS_MLP = ("mlp", "neumf", "history")


class UniformDropout(nn.Dropout):
    """Dropout whose CPU mask compares 16 random bits per element with p x 65,536 (p to within 1/65,536, the
    kept values scaled so the mean is exact): numpy's PCG64 makes those bits about four times faster than
    torch's CPU `rand_like`, and `bernoulli_` is slower still; either cost more than the matrix product of
    the layer the dropout follows. Each call seeds the bits from one draw of torch's RNG, so torch's
    seed fixes every mask, as with `nn.Dropout`. On GPU, `nn.Dropout`'s fused kernel."""

    LEVELS = 1 << 16

    def __init__(self, p: float):
        super().__init__(p)
        self.threshold = round(p * self.LEVELS)
        self.scale = self.LEVELS / (self.LEVELS - self.threshold) if self.threshold < self.LEVELS else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_cuda:
            return super().forward(x)
        bits = np.random.default_rng(int(torch.randint(2**62, ()))).bytes(2 * x.numel())
        draws = np.frombuffer(bits, np.uint16).reshape(x.shape)
        return x * torch.from_numpy(draws >= self.threshold).to(x.dtype).mul_(self.scale)


HAS_GMF = ("gmf", "neumf")


class NCF(nn.Module):
    def __init__(self, n_users: int, n_movies: int, cfg: ModelConfig, genres: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.embedding_dim
        # Registration order fixes the order reset_parameters draws from the RNG: the deck's model
        # (mlp, attention, rating) registers exactly the modules it always had, in the same order.
        self.user_embedding = nn.Embedding(n_users, d, sparse=cfg.sparse_embeddings)
        self.movie_embedding = nn.Embedding(n_movies, d, sparse=cfg.sparse_embeddings)
        if cfg.use_genres:
            if genres is None:
                raise ValueError("model.use_genres needs the movie x genre matrix")
            self.register_buffer("genres", genres.float())
            self.genre_projection = nn.Linear(genres.shape[1], d, bias=False)
        if cfg.attention:
            self.attention = nn.Linear(2 * d, 2)
        width = 0
        if cfg.architecture in HAS_MLP:
            layers: list[nn.Module] = []
            width = 2 * d
            for hidden, dropout in zip(cfg.hidden_dims, cfg.dropouts, strict=True):
                layers.append(nn.Linear(width, hidden))
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm1d(hidden))
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(UniformDropout(dropout))
                width = hidden
            self.mlp = nn.Sequential(*layers)
        if cfg.architecture in HAS_GMF:
            width += d
        if cfg.objective in ("rating", "joint"):
            self.rating_head = nn.Linear(width, 1)
        if cfg.objective in ("implicit", "joint"):
            self.interaction_head = nn.Linear(width, 1)
        if cfg.use_bias:
            self.user_bias = nn.Embedding(n_users, 1, sparse=cfg.sparse_embeddings)
            self.movie_bias = nn.Embedding(n_movies, 1, sparse=cfg.sparse_embeddings)
        if self.reads_history:
            self.history = HistoryEncoder(n_users, n_movies, d, cfg.history_length, cfg.sparse_embeddings)
        self.reset_parameters()

    @property
    def reads_history(self) -> bool:
        """Whether the user side also reads the user's own ratings (`model.architecture: history`)."""
        return self.cfg.architecture == "history"

    def remember(self, ratings: Ratings) -> None:
        """The ratings a history model's user side reads of each known user (nothing for the others)."""
        if self.reads_history:
            self.history.remember(ratings)

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads this model has, of "rating" and "interaction"."""
        return {"rating": ("rating",), "implicit": ("interaction",), "joint": ("rating", "interaction")}[
            self.cfg.objective]

    @property
    def ranking_head(self) -> str:
        """The head whose logit ranks and gives the strength: rating for `rating` models, else interaction."""
        return "rating" if self.cfg.objective == "rating" else "interaction"

    def reset_parameters(self) -> None:
        """Xavier for every weight matrix and embedding, zero biases (the deck's init).

        Batch norm goes back to its own init (unit scale, zero shift, fresh running
        statistics), so a refit in place starts from nothing the search phase learnt.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.xavier_uniform_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
        if self.cfg.use_bias:
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.movie_bias.weight)
        if self.reads_history:
            self.history.reset_parameters()

    def movie_vectors(self, movies: torch.Tensor) -> torch.Tensor:
        """Movie-side representation: embedding, plus projected genres when enabled."""
        m = self.movie_embedding(movies)
        if self.cfg.use_genres:
            m = m + self.genre_projection(self.genres[movies])
        return m

    def _scale(self, strength: torch.Tensor) -> torch.Tensor:
        return self.cfg.rating_min + (self.cfg.rating_max - self.cfg.rating_min) * strength

    def _outputs(self, logits: dict[str, torch.Tensor], weights: tuple[torch.Tensor, torch.Tensor]) -> ModelOutput:
        """Heads' logits -> the pair's rating, strength and ranking logit."""
        logit = logits[self.ranking_head]
        strength = torch.sigmoid(logit)
        rating = self._scale(torch.sigmoid(logits["rating"]) if "rating" in logits else strength)
        return ModelOutput(rating, strength, weights[0], weights[1], logit)

    def id_side(self, users: torch.Tensor) -> UserSide:
        """The trained id vectors of `users` (indices): their whole user side, except in a history model."""
        return UserSide(self.user_embedding(users), self.user_bias(users).squeeze(-1) if self.cfg.use_bias else None)

    def user_side(self, users: torch.Tensor, before: torch.Tensor | None = None) -> UserSide:
        """The user side of `users` (indices). A history model adds each user's pooled history: the ratings given
        before the user's rating of `before[i]`, or their latest where they have none (or `before` is None)."""
        side = self.id_side(users)
        if not self.reads_history:
            return side
        return UserSide(side.embedding + self.history(users, before), side.bias)

    def forward(self, users: torch.Tensor, movies: torch.Tensor, before: torch.Tensor | None = None) -> ModelOutput:
        """Pairs (users[i], movies[i]). A history model reads each user's ratings given before their rating of
        `before[i]`: training passes each pair's own movie, so a pair never reads its own rating or a later one
        (a sampled unrated movie passes its rated movie's). Without `before`, every remembered rating, as served."""
        return self.forward_user_side(self.user_side(users, before), movies)

    def forward_user_side(self, side: UserSide, movies: torch.Tensor, rows: torch.Tensor | None = None) -> ModelOutput:
        """`forward` from given user vectors: pair i is user row `rows[i]` of `side` (row i without `rows`)
        with `movies[i]`."""
        u = side.embedding if rows is None else side.embedding[rows]
        m = self.movie_vectors(movies)
        if self.cfg.attention:
            weights = torch.softmax(self.attention(torch.cat([u, m], dim=-1)), dim=-1)
            user_weight, movie_weight = weights[:, 0], weights[:, 1]
        else:
            user_weight = movie_weight = torch.full(movies.shape, 0.5, device=u.device, dtype=u.dtype)
        gu, gm = 2 * user_weight[:, None] * u, 2 * movie_weight[:, None] * m
        features = []
        if self.cfg.architecture in HAS_MLP:
            features.append(self.mlp(torch.cat([gu, gm], dim=-1)))
        if self.cfg.architecture in HAS_GMF:
            features.append(gu * gm)
        h = features[0] if len(features) == 1 else torch.cat(features, dim=-1)
        logits = {head: getattr(self, f"{head}_head")(h).squeeze(-1) for head in self.heads}
        if self.cfg.use_bias:
            bias = (side.bias if rows is None else side.bias[rows]) + self.movie_bias(movies).squeeze(-1)
            logits = {head: value + bias for head, value in logits.items()}
        return self._outputs(logits, (user_weight, movie_weight))

    def _inference_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of each linear MLP layer with its eval-mode batch norm folded in."""
        layers, pending = [], None
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                if pending is not None:
                    layers.append(pending)
                pending = (module.weight, module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                scale = module.weight / torch.sqrt(module.running_var + module.eps)
                weight, bias = pending
                pending = (weight * scale[:, None], (bias - module.running_mean) * scale + module.bias)
        layers.append(pending)
        return layers

    @torch.no_grad()
    def movie_side(self, movies: torch.Tensor | None = None) -> MovieSide:
        """What `score_users` computes per movie; compute it once and pass it in while the weights stay fixed."""
        if movies is None:
            movies = torch.arange(self.movie_embedding.num_embeddings, device=self.movie_embedding.weight.device)
        d = self.cfg.embedding_dim
        m = self.movie_vectors(movies)
        attention = m @ self.attention.weight[:, d:].T + self.attention.bias if self.cfg.attention else None
        layers, first = [], None
        if self.cfg.architecture in HAS_MLP:
            layers = self._inference_layers()
            first = m @ layers[0][0][:, d:].T
        return MovieSide(movies, attention, first, layers, m)

    @torch.no_grad()
    def score_users(self, users: torch.Tensor, movies: torch.Tensor | None = None,
                    movie_side: MovieSide | None = None) -> torch.Tensor:
        """The ranking logit of every movie (or `movies`, or `movie_side`'s movies) for each user:
        [len(users), n], ordered as the eval-mode `forward` ranks them (`_evaluate` on the grid)."""
        return self.score_user_side(self.user_side(users), movies, movie_side)

    @torch.no_grad()
    def score_user_side(self, user_side: UserSide, movies: torch.Tensor | None = None,
                        movie_side: MovieSide | None = None) -> torch.Tensor:
        """`score_users` from given user vectors (a row per user)."""
        side = movie_side or self.movie_side(movies)
        logits, _ = self._evaluate(user_side, side, _Grid(), (self.ranking_head,))
        return logits[self.ranking_head]

    @torch.no_grad()
    def infer(self, users: torch.Tensor, movies: torch.Tensor, movie_side: MovieSide | None = None,
              user_side: UserSide | None = None) -> ModelOutput:
        """The eval-mode `forward` on (user, movie) pairs, computed cheaper (`_evaluate` on the pairs): each
        distinct user's and movie's half of the attention logits and of the first layer is computed once,
        however many pairs share it (a user's re-ranked candidates share the user; validation pairs share
        their few hundred users), and batch norm is folded into the linear layers. `movie_side`: computed
        once for sorted movies that include all of `movies`, when several calls share them. With `user_side`,
        `users` are its rows (`forward_user_side`), not user indices."""
        if user_side is None:
            unique_users, users = torch.unique(users, return_inverse=True)
            user_side = self.user_side(unique_users)
        side = movie_side or self.movie_side(torch.unique(movies))
        logits, weights = self._evaluate(user_side, side, _Pairs(users, torch.searchsorted(side.movies, movies)),
                                         self.heads)
        return self._outputs(logits, (weights[:, 0] / 2, weights[:, 1] / 2))

    def pair_logits(self, user_side: UserSide, rows: torch.Tensor, movies: torch.Tensor, movie_side: MovieSide,
                    head: str) -> torch.Tensor:
        """`head`'s eval-mode logit of each pair (row `rows[i]` of `user_side`, `movies[i]`, among `movie_side`'s
        movies), differentiable in `user_side`: what `ncf.fold_in` fits."""
        layout = _Pairs(rows, torch.searchsorted(movie_side.movies, movies))
        return self._evaluate(user_side, movie_side, layout, (head,))[0][head]

    def _evaluate(self, user_side: UserSide, side: MovieSide, layout: _Grid | _Pairs,
                  heads: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The eval-mode forward from the users' vectors and each movie's `side`, combined by `layout`
        (every user with every movie, or given pairs): `heads`' logits and the doubled gates (2 w_u, 2 w_m).

        The attention logits and the first layer are linear in [u; m], so their user and movie halves
        are computed once per user and once per movie and only added per pair; the GMF path's share of
        a head is 4 w_u w_m ((u * head weights) . m).
        """
        d = self.cfg.embedding_dim
        u = user_side.embedding
        if self.cfg.attention:
            weights = 2 * torch.softmax(torch.add(*layout.pair(u @ self.attention.weight[:, :d].T, side.attention)),
                                        dim=-1)
        else:
            weights = torch.ones(*layout.shape(len(u), len(side.movies)), 2, device=u.device)
        shape = weights.shape[:-1]
        logits = {head: getattr(self, f"{head}_head").bias.expand(shape).clone() for head in heads}
        width = 0
        if self.cfg.architecture in HAS_MLP:
            (first_w, first_b), *rest = side.layers
            user_part, movie_part = layout.pair(u @ first_w[:, :d].T, side.first)
            hidden = torch.mul(weights[..., :1], user_part)
            hidden.addcmul_(weights[..., 1:], movie_part).add_(first_b).relu_()
            hidden = hidden.view(-1, hidden.shape[-1])
            for weight, bias in rest:
                hidden = torch.addmm(bias, hidden, weight.T).relu_()
            width = hidden.shape[-1]
            for head in heads:
                logits[head] += (hidden @ getattr(self, f"{head}_head").weight[0, :width]).view(shape)
        if self.cfg.architecture in HAS_GMF:
            gates = weights[..., 0] * weights[..., 1]
            for head in heads:
                logits[head] += gates * layout.dot(u * getattr(self, f"{head}_head").weight[0, width:], side.vectors)
        if self.cfg.use_bias:
            bias = torch.add(*layout.pair(user_side.bias, self.movie_bias(side.movies)[:, 0]))
            logits = {head: value + bias for head, value in logits.items()}
        return logits, weights


class _Grid:
    """Every user with every movie: user rows broadcast against movie rows, [users, movies, ...]."""

    @staticmethod
    def shape(n_users: int, n_movies: int) -> tuple[int, ...]:
        return n_users, n_movies

    @staticmethod
    def pair(user_part: torch.Tensor, movie_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return user_part[:, None], movie_part[None]

    @staticmethod
    def dot(user_part: torch.Tensor, movie_part: torch.Tensor) -> torch.Tensor:
        return user_part @ movie_part.T


class _Pairs:
    """Given pairs: row `user_rows[i]` of the user parts with row `movie_rows[i]` of the movie parts, [pairs, ...]."""

    def __init__(self, user_rows: torch.Tensor, movie_rows: torch.Tensor):
        self.user_rows, self.movie_rows = user_rows, movie_rows

    def shape(self, n_users: int, n_movies: int) -> tuple[int, ...]:
        return (len(self.user_rows),)

    def pair(self, user_part: torch.Tensor, movie_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return user_part.index_select(0, self.user_rows), movie_part.index_select(0, self.movie_rows)

    def dot(self, user_part: torch.Tensor, movie_part: torch.Tensor) -> torch.Tensor:
        return torch.mul(*self.pair(user_part, movie_part)).sum(-1)


@torch.no_grad()
def forward_batched(model: NCF, users: torch.Tensor, movies: torch.Tensor, batch_size: int = 8192,
                    user_side: UserSide | None = None) -> ModelOutput:
    """The eval-mode forward (`NCF.infer`; with `user_side`, `users` are its rows) over any number of pairs, a batch
    at a time, gathered on the CPU (a batch's activations, not the pairs', bound the memory). 8,192 pairs keep the
    largest activation (512 wide) at 16 MB, under glibc's 32 MB cap on its mmap threshold: freed blocks are reused,
    where 32 MB ones would be mapped and page-faulted afresh every batch (ten times slower per byte).

    Each batch's output is copied into tensors allocated once for all pairs: small per-batch outputs kept
    alive between the batches' large, freed activations fragment the C heap, which then grows by about
    0.7 KB per pair (1.4 GB for ML-25M's 2M validation pairs) and does not shrink back."""
    model.eval()
    device = next(model.parameters()).device
    users, movies = torch.as_tensor(users), torch.as_tensor(movies)
    out = ModelOutput(*(torch.empty(len(users)) for _ in ModelOutput._fields))
    # The movie side once for every batch when it is no larger than a batch's activations (distinct movies at most
    # a batch), else per batch: memory stays bounded by the batch, whatever the number of pairs.
    distinct = torch.unique(movies)
    side = model.movie_side(distinct.to(device)) if len(distinct) <= batch_size else None
    for start in range(0, len(users), batch_size):
        part = model.infer(users[start: start + batch_size].to(device), movies[start: start + batch_size].to(device),
                           side, user_side)
        for whole, piece in zip(out, part, strict=True):
            whole[start: start + batch_size] = piece.float().cpu()
    return out


def count_flops_per_sample(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of one forward pass through attention, paths and heads (embeddings are lookups)."""
    d = cfg.embedding_dim
    macs = 2 * d * 2 if cfg.attention else 0
    if cfg.architecture == "history":
        macs += cfg.history_length * d  # the pooling of the user's history
    width = 0
    if cfg.architecture in HAS_MLP:
        width = 2 * d
        for hidden in cfg.hidden_dims:
            macs += width * hidden
            width = hidden
    if cfg.architecture in HAS_GMF:
        macs += d
        width += d
    macs += width * (2 if cfg.objective == "joint" else 1)
    return 2 * macs
