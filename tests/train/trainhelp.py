"""Shared helpers of the trainer tests: a tiny attention LM, a copy-the-previous-token task, and a
recorder of the learning rate and gradient norm before every optimizer step."""

from __future__ import annotations

import torch

from memlab.models.lm import LM
from memlab.tasks import TokenData
from memlab.train import seed_everything


def tiny_model(seed: int = 0, vocab: int = 32) -> LM:
    seed_everything(seed)
    return LM.from_mixer("attention", vocab_size=vocab, d_model=32, n_layers=1, n_heads=2)


def copy_prev(n: int, length: int, seed: int, vocab: int = 32) -> TokenData:
    """Predict the previous token: one attention layer learns it in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = torch.full_like(x, -100)
    y[:, 1:] = x[:, :-1]
    return TokenData(x, y)


class StepRecorder:
    """Records, before every optimizer step, the learning rate and the total gradient norm."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []

    def __call__(self, optimizer, args, kwargs) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
