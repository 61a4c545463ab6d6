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
    """No eviction. Takes no budget: ``build("full")``.

    ``observe_window`` and ``observe_mass`` make it record what other policies score with (the
    last queries, H2O's attention mass), so that one full prefill can be forked into compressed
    caches (``KVCache.fork``) without running the prompt again.
    """

    observe_window: int = 0
    observe_mass: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        w = self.observe_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"policy 'full': observe_window={self.observe_window!r} must be an int >= 0")
        self.needs_mass = bool(self.observe_mass)
        if self.tokens is not None or self.ratio is not None:
            raise ValueError(
                "policy 'full' keeps every token and takes no budget; got "
                f"tokens={self.tokens}, ratio={self.ratio}"
            )

    def group_budget(
        self, layer: int, n_layers: int, group: int, seen: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        return None

    def query_window(self) -> int:
        return self.observe_window

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.positions.float()
