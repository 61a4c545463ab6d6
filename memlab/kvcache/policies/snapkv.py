"""``snapkv``: SnapKV (Li et al. 2024).

The last ``window`` queries (the observation window) vote: each cached token's score is its mean
attention from those queries, smoothed along the sequence by pooling (so that the neighbours of
an important token stay too), averaged over the query heads that share its KV head. The window
itself always stays. Compression happens on the prompt; the generated tokens are appended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlab.kvcache.policies.base import Observation, Policy, check_nonneg_int, pool1d, register


def window_scores(obs: Observation, kernel: int, pooling: str, group_reduce: str = "mean") -> torch.Tensor:
    """SnapKV's vote: (B, S, G) pooled mean attention of the observation window, reduced over the
    query heads that share a KV head (``mean`` as kvpress does, or ``max``)."""
    probs = obs.window_probs()  # (B, G, R, W, S)
    n_q = obs.query_valid.sum(dim=1).clamp(min=1).to(probs.dtype)  # (B,)
    per_head = probs.sum(dim=3) / n_q[:, None, None, None]  # (B, G, R, S)
    b, g, r, s = per_head.shape
    pooled = pool1d(per_head.permute(0, 3, 1, 2).reshape(b, s, g * r), kernel, pooling)  # (B, S, G*R)
    pooled = pooled.view(b, s, g, r)
    return pooled.amax(dim=3) if group_reduce == "max" else pooled.mean(dim=3)


@register("snapkv")
@dataclass(kw_only=True)
class SnapKV(Policy):
    """Observation ``window`` (always kept), pooling ``kernel`` and mode ("avg" or "max").

    Defaults follow SnapKV's long-context experiments: window 32, max pooling over 7 tokens.
    SnapKV selects per query head; a KV head shared by R query heads (GQA) keeps the tokens with
    the highest vote of any of them (``group_reduce="max"``), so that one head's strong vote is
    not averaged away. (kvpress averages the votes and uses window 64 with average pooling over
    5: ``window=64, kernel=5, pooling="avg", group_reduce="mean"`` reproduces it.)
    """

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    group_reduce: str = "max"  # how the query heads of one KV head combine their votes
    needs_queries = True

    def __post_init__(self) -> None:
        check_nonneg_int(f"policy {self.name!r}", window=self.window, kernel=self.kernel)
        if self.window < 1 or self.kernel < 1:
            raise ValueError(
                f"policy {self.name!r}: window and kernel must be >= 1, got {self.window}, {self.kernel}"
            )
        if self.group_reduce not in ("mean", "max"):
            raise ValueError(
                f"policy {self.name!r}: group_reduce={self.group_reduce!r} must be 'mean' or 'max'"
            )
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"policy {self.name!r}: pooling={self.pooling!r} must be 'avg' or 'max'")
        super().__post_init__()

    def protected(self) -> int:
        return self.window

    def query_window(self) -> int:
        return self.window

    def score(self, obs: Observation) -> torch.Tensor:
        scores = window_scores(obs, self.kernel, self.pooling, self.group_reduce)
        return scores.masked_fill(obs.recent(self.window), float("inf"))
