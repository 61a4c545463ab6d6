"""``pyramidkv``: PyramidKV (Cai et al. 2024): SnapKV's selection with budgets that shrink with depth.

Lower layers attend broadly and get more tokens, upper layers fewer: the budgets beyond the
observation window form an arithmetic sequence from ``2a - a/beta`` at layer 0 down to
``a/beta`` at the last layer, where ``a`` is the average budget beyond the window. The total over
layers equals the uniform budget times the number of layers, to the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from memlab.kvcache.policies.base import register, split_exact
from memlab.kvcache.policies.snapkv import SnapKV

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache


def pyramid_budgets(avg_extra: int, seen_extra: int, n_layers: int, beta: float) -> list[int]:
    """Per-layer tokens beyond the window: an arithmetic sequence summing to ``n_layers * avg_extra``.

    No layer may take more than ``seen_extra`` (the tokens outside the window).
    """
    total = n_layers * avg_extra
    if n_layers == 1 or avg_extra == 0:
        return [avg_extra] * n_layers
    lo = avg_extra / beta
    hi = 2 * avg_extra - lo
    if hi > seen_extra:
        # The bottom layer cannot hold more than exists: flatten the pyramid, same total.
        hi = float(seen_extra)
        lo = 2 * avg_extra - hi
    step = (hi - lo) / (n_layers - 1)
    weights = [hi - i * step for i in range(n_layers)]
    return split_exact(weights, total, caps=[seen_extra] * n_layers)


@register("pyramidkv")
@dataclass(kw_only=True)
class PyramidKV(SnapKV):
    """Defaults of the PyramidKV authors' code: window 8, max pooling over 7, beta 20."""

    window: int = 8
    beta: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise ValueError(f"policy 'pyramidkv': beta={self.beta!r} must be >= 1")
        super().__post_init__()

    def layer_budget(self, layer: int, n_layers: int, seen: torch.Tensor, cache: KVCache) -> torch.Tensor:
        avg = self.budget(seen, cap=not cache.frozen)  # (B,) the uniform budget, window included
        memo = cache.state.setdefault("pyramid", {})
        out = []
        for a, s in zip(avg.tolist(), seen.tolist(), strict=True):
            if cache.frozen:
                # Decoding budget of a prompt shorter than the budget: the pyramid of a prompt of
                # ``a`` tokens, so the cache may grow to the budget instead of evicting each new
                # token (capping at the prompt's length did).
                s = max(s, a)
            key = (a, s, n_layers)
            if key not in memo:
                extra = max(a - self.window, 0)
                shares = pyramid_budgets(extra, max(s - self.window, 0), n_layers, float(self.beta))
                memo[key] = [x + min(self.window, s) for x in shares]
            out.append(memo[key][layer])
        return torch.tensor(out, dtype=torch.int64, device=seen.device)
