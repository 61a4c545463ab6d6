"""``h2o``: Heavy-Hitter Oracle (Zhang et al. 2023).

Each cached token accumulates the attention it receives from every query (prompt and generated,
summed over the query heads that read its KV head). The budget is shared between the most recent
tokens and the heavy hitters, the tokens with the largest accumulated attention; eviction runs at
prefill and at every decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlab.kvcache.policies.base import Observation, Policy, register


@register("h2o")
@dataclass(kw_only=True)
class H2O(Policy):
    """``recent_fraction`` of the budget goes to recent tokens, the rest to heavy hitters."""

    recent_fraction: float = 0.5
    compress_decoding: bool = True
    needs_mass = True

    def __post_init__(self) -> None:
        if not isinstance(self.recent_fraction, (int, float)) or not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"policy 'h2o': recent_fraction={self.recent_fraction!r} must be in [0, 1]")
        super().__post_init__()

    def protected(self) -> int:
        return 1

    def score(self, obs: Observation) -> torch.Tensor:
        if obs.mass is None or obs.budget is None:
            raise ValueError("h2o scores need the accumulated attention mass and the budget")
        # (B, 1, G): recent tokens per (batch, head); at least the newest token stays.
        n_recent = torch.ceil(obs.budget.double() * self.recent_fraction).long().clamp(min=1)
        recent = obs.valid & (obs.positions >= obs.seen[:, None, None] - n_recent[:, None, :])
        return obs.mass.float().masked_fill(recent, float("inf"))
