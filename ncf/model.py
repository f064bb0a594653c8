"""The NCF model of the deck, with attention over its two sources built in.

user id -> embedding u, movie id -> embedding m (plus a genre projection when
enabled). An attention layer reads [u; m] and gives two weights (user, movie)
that sum to 1; the MLP sees [2 w_u u; 2 w_m m], so equal weights leave the inputs
unchanged and the weights say how much each side drives the prediction.
The output is sigmoid(z) scaled to [rating_min, rating_max]; sigmoid(z) itself is
the recommendation strength in [0, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ncf.config import ModelConfig


class ModelOutput(NamedTuple):
    """What the model says of each (user, movie) pair."""

    rating: torch.Tensor
    strength: torch.Tensor
    user_weight: torch.Tensor
    movie_weight: torch.Tensor


class MovieSide(NamedTuple):
    """The movie halves of the attention logits (bias included) and of the first layer, and the
    eval-mode layers with batch norm folded in: the part of `NCF.score_users` no user changes."""

    movies: torch.Tensor
    attention: torch.Tensor  # movies x 2
    first: torch.Tensor  # movies x first hidden width
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class NCF(nn.Module):
    def __init__(self, n_users: int, n_movies: int, cfg: ModelConfig, genres: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.embedding_dim
        self.user_embedding = nn.Embedding(n_users, d)
        self.movie_embedding = nn.Embedding(n_movies, d)
        if cfg.use_genres:
            if genres is None:
                raise ValueError("model.use_genres needs the movie x genre matrix")
            self.register_buffer("genres", genres.float())
            self.genre_projection = nn.Linear(genres.shape[1], d, bias=False)
        self.attention = nn.Linear(2 * d, 2)
        layers: list[nn.Module] = []
        width = 2 * d
        for hidden, dropout in zip(cfg.hidden_dims, cfg.dropouts, strict=True):
            layers.append(nn.Linear(width, hidden))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        if cfg.use_bias:
            self.user_bias = nn.Embedding(n_users, 1)
            self.movie_bias = nn.Embedding(n_movies, 1)
        self.reset_parameters()

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

    def movie_vectors(self, movies: torch.Tensor) -> torch.Tensor:
        """Movie-side representation: embedding, plus projected genres when enabled."""
        m = self.movie_embedding(movies)
        if self.cfg.use_genres:
            m = m + self.genre_projection(self.genres[movies])
        return m

    def forward(self, users: torch.Tensor, movies: torch.Tensor) -> ModelOutput:
        u = self.user_embedding(users)
        m = self.movie_vectors(movies)
        weights = torch.softmax(self.attention(torch.cat([u, m], dim=-1)), dim=-1)
        gated = torch.cat([2 * weights[:, :1] * u, 2 * weights[:, 1:] * m], dim=-1)
        logit = self.mlp(gated).squeeze(-1)
        if self.cfg.use_bias:
            logit = logit + self.user_bias(users).squeeze(-1) + self.movie_bias(movies).squeeze(-1)
        strength = torch.sigmoid(logit)
        rating = self.cfg.rating_min + (self.cfg.rating_max - self.cfg.rating_min) * strength
        return ModelOutput(rating, strength, weights[:, 0], weights[:, 1])

    def _inference_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of each linear layer with its eval-mode batch norm folded in."""
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
        layers = self._inference_layers()
        return MovieSide(movies, m @ self.attention.weight[:, d:].T + self.attention.bias, m @ layers[0][0][:, d:].T,
                         layers)

    @torch.no_grad()
    def score_users(self, users: torch.Tensor, movies: torch.Tensor | None = None,
                    movie_side: MovieSide | None = None) -> torch.Tensor:
        """Predicted ratings of every movie (or `movies`, or `movie_side`'s movies) for each user: [len(users), n].

        The eval-mode `forward` on the user x movie grid, computed cheaper: the attention
        logits and the first layer are linear in [u; m], so their user and movie halves
        are computed once per user and once per movie rather than once per pair, and
        batch norm is folded into the linear layers.
        """
        side = movie_side or self.movie_side(movies)
        d = self.cfg.embedding_dim
        u = self.user_embedding(users)
        logits = (u @ self.attention.weight[:, :d].T)[:, None, :] + side.attention[None, :, :]
        weights = 2 * torch.softmax(logits, dim=-1)  # users x movies x 2, gates as in forward
        (first_w, first_b), *rest = side.layers
        user_part = (u @ first_w[:, :d].T)[:, None, :]
        hidden = torch.mul(weights[..., :1], user_part)
        hidden.addcmul_(weights[..., 1:], side.first[None, :, :]).add_(first_b).relu_()
        hidden = hidden.view(-1, hidden.shape[-1])
        for i, (weight, bias) in enumerate(rest):
            hidden = torch.addmm(bias, hidden, weight.T)
            if i < len(rest) - 1:
                hidden.relu_()
        logit = hidden.view(len(users), len(side.movies))
        if self.cfg.use_bias:
            logit = logit + self.user_bias(users) + self.movie_bias(side.movies).T
        return self.cfg.rating_min + (self.cfg.rating_max - self.cfg.rating_min) * torch.sigmoid(logit)


@torch.no_grad()
def forward_batched(model: NCF, users: torch.Tensor, movies: torch.Tensor, batch_size: int = 65536) -> ModelOutput:
    """The eval-mode forward pass over any number of pairs, a batch at a time, gathered on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    users, movies = torch.as_tensor(users), torch.as_tensor(movies)
    parts = [model(users[i: i + batch_size].to(device), movies[i: i + batch_size].to(device))
             for i in range(0, len(users), batch_size)]
    if not parts:
        return ModelOutput(*(torch.empty(0) for _ in ModelOutput._fields))
    return ModelOutput(*(torch.cat([getattr(p, f).float().cpu() for p in parts]) for f in ModelOutput._fields))


def count_flops_per_sample(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of one forward pass through attention and MLP (embeddings are lookups)."""
    width = 2 * cfg.embedding_dim
    macs = width * 2  # attention
    for hidden in cfg.hidden_dims:
        macs += width * hidden
        width = hidden
    macs += width
    return 2 * macs
