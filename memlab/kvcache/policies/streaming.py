"""``streaming``: StreamingLLM (Xiao et al. 2023): attention sinks plus a window of recent tokens.

The first ``sinks`` tokens of the sequence and the most recent ``budget - sinks`` tokens stay;
everything between them is evicted, at prefill and at every decoding step, so memory is constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlab.kvcache.policies.base import Observation, Policy, check_nonneg_int, register


@register("streaming")
@dataclass(kw_only=True)
class Streaming(Policy):
    """Sinks + recent window. ``window`` is the smallest recent window a budget may leave."""

    sinks: int = 4
    window: int = 1
    compress_decoding: bool = True

    def __post_init__(self) -> None:
        check_nonneg_int("policy 'streaming'", sinks=self.sinks, window=self.window)
        if self.window < 1:
            raise ValueError(f"policy 'streaming': window={self.window} must be >= 1")
        super().__post_init__()

    def protected(self) -> int:
        return self.sinks + self.window

    def score(self, obs: Observation) -> torch.Tensor:
        # Newer is better; sinks always stay. Keeping the top ``budget`` therefore keeps the
        # sinks and the ``budget - sinks`` most recent tokens.
        score = obs.positions.float()
        return score.masked_fill(obs.sinks(self.sinks), float("inf"))
