"""``full``: keep every key and value (the reference every policy is measured against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from memlab.kvcache.policies.base import FixedKeepPolicy, Observation, register

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache


@register("full")
@dataclass(kw_only=True)
class Full(FixedKeepPolicy):
    """No eviction. Takes no budget: ``build("full")``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens is not None or self.ratio is not None:
            raise ValueError(
                "policy 'full' keeps every token and takes no budget; got "
                f"tokens={self.tokens}, ratio={self.ratio}"
            )

    def group_budget(
        self, layer: int, n_layers: int, group: int, seen: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        return None

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.positions.float()
