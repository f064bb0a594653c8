"""The optimizer the loop steps: Adam, or `SparseDenseAdam` when the embedding tables have sparse gradients."""

from __future__ import annotations

import torch
from torch import nn

from ncf.config import TrainConfig
from ncf.model import NCF


class SparseDenseAdam(torch.optim.Optimizer):
    """SparseAdam for the sparse-gradient embedding tables and Adam for the rest, as one optimizer: the
    loop steps it, the LR scheduler sets the lr of its groups (the groups of both), checkpoints save
    and restore both states.

    SparseAdam moves only the rows a batch touched (lazy Adam: an untouched row keeps its moments and
    its value). It has no weight decay: here the L2 term is added to the touched rows' gradients, as
    Adam adds it to every row's.
    """

    def __init__(self, dense: list[nn.Parameter], sparse: list[nn.Parameter], lr: float, weight_decay: float):
        self.dense = torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay, foreach=True)
        self.sparse = torch.optim.SparseAdam(sparse, lr=lr)
        self.weight_decay = weight_decay
        super().__init__(dense + sparse, {"lr": lr})
        self.param_groups = self.dense.param_groups + self.sparse.param_groups  # the same dicts: one lr

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SparseDenseAdam.step takes no closure")
        if self.weight_decay:
            for p in self.sparse.param_groups[0]["params"]:
                if p.grad is not None:
                    grad = p.grad.coalesce()
                    rows = grad.indices()[0]
                    p.grad = torch.sparse_coo_tensor(grad.indices(), grad.values() + self.weight_decay * p[rows],
                                                     grad.shape, is_coalesced=True, check_invariants=False)
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"dense", "sparse"}:
            raise ValueError("the checkpoint's optimizer state is not SparseDenseAdam's: was it saved with "
                             "model.sparse_embeddings false?")
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])
        self.param_groups = self.dense.param_groups + self.sparse.param_groups


def make_optimizer(model: NCF, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (multi-tensor: one kernel per step for all parameters), or `SparseDenseAdam` when the model's
    embedding tables have sparse gradients (`model.sparse_embeddings`)."""
    sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    if not sparse:
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                foreach=True)
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    return SparseDenseAdam(dense, sparse, cfg.learning_rate, cfg.weight_decay)
