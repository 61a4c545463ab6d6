"""``delta``: DELTA, Dynamic Layer-Aware Token Attention (Entezari Zarch et al. 2025).

The full KV cache is kept (no memory is saved); decoding computation is. Layers fall in three
groups:
- ``full_layers`` (the first ones): full attention;
- ``delta_layers`` (a few): full attention, and they select the salient tokens: the current
  query's attention, maximised over all heads of the layer (one selection shared by every head),
  summed per page of ``page`` tokens; the top pages plus the ``recent_pages`` last pages form the
  selection;
- every other layer after the first delta layer: sparse attention over the latest selection
  only (``budget`` tokens), rows gathered from its own full cache.
The cache counts the rows every decoding query reads (``KVCache.attended_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from memlab.kvcache.policies.base import Observation, Policy, check_nonneg_int, register

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache


def default_layers(n_layers: int) -> tuple[list[int], list[int]]:
    """DELTA's published layout for a 28-layer model (full 0, 1; delta 2, 14, 22), scaled."""
    full = [i for i in (0, 1) if i < n_layers]
    delta = sorted({min(n_layers - 1, round(f * n_layers)) for f in (2 / 28, 14 / 28, 22 / 28)} - set(full))
    if not delta and n_layers > 0:
        # Models of 1 or 2 layers: the full layers took every layer and the default layout had no
        # delta layer, so build() worked but every forward raised. The last layer selects.
        full, delta = full[: n_layers - 1], [n_layers - 1]
    return full, delta


@register("delta")
@dataclass(kw_only=True)
class DELTA(Policy):
    """``tokens``/``ratio``: tokens the sparse layers attend to (of the tokens held)."""

    page: int = 16
    recent_pages: int = 8
    full_layers: list[int] | None = None
    delta_layers: list[int] | None = None
    _layout: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_nonneg_int("policy 'delta'", page=self.page, recent_pages=self.recent_pages)
        if self.page < 1:
            raise ValueError(f"policy 'delta': page={self.page} must be >= 1")
        super().__post_init__()

    def protected(self) -> int:
        return self.recent_pages * self.page

    def group_budget(
        self, layer: int, n_layers: int, group: int, seen: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        return None  # DELTA keeps the full cache

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.positions.float()

    def layout(self, n_layers: int) -> tuple[list[int], list[int]]:
        if n_layers not in self._layout:
            full, delta = default_layers(n_layers)
            full = list(self.full_layers) if self.full_layers is not None else full
            delta = list(self.delta_layers) if self.delta_layers is not None else delta
            bad = [
                i for i in full + delta
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers
            ]
            if bad:
                raise ValueError(
                    f"policy 'delta': layers {bad} out of range for a model of {n_layers} layers "
                    f"(full_layers={full}, delta_layers={delta}); expected ints in [0, {n_layers - 1}]"
                )
            if not delta:
                raise ValueError(
                    f"policy 'delta': delta_layers={delta} is empty; expected at least one layer index "
                    f"in [0, {n_layers - 1}] to select the tokens"
                )
            self._layout[n_layers] = (full, delta)
        return self._layout[n_layers]

    def attention_rows(
        self, cache: KVCache, layer: Any, group: int, q: torch.Tensor, scale: float, phase: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if phase != "decode" or q.shape[1] != 1:
            return None
        li = layer.layer_idx
        full, delta = self.layout(cache.n_layers)
        if li in delta:
            self._vote(cache, layer, group, q, scale)
            return None
        if li in full or li < delta[0]:
            return None
        sel = cache.state.get("delta_rows")
        if sel is None:
            return None
        rows, lengths = sel  # (B, K) rows in ascending order, (B,) how many are in use
        g = layer.groups[group]
        # Every KV head of the layer reads the same rows (unified head selection).
        idx = rows[:, :, None].expand(-1, -1, len(g.heads))
        return idx, torch.minimum(lengths[:, None], g.lengths).expand_as(g.lengths)

    def _vote(self, cache: KVCache, layer: Any, group: int, q: torch.Tensor, scale: float) -> None:
        """Accumulate the max-over-heads attention of this layer; select after its last group."""
        g = layer.groups[group]
        b, s, gsz, d = g.keys.shape
        r = q.shape[2] // gsz
        qh = q[:, 0].float().view(b, gsz, r, d)  # (B, G, R, D)
        logits = torch.einsum("bgrd,bsgd->bgrs", qh, g.keys.float()) * scale
        valid = torch.arange(s, device=q.device)[None, None, None, :] < g.lengths[:, :, None, None]
        probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
        best = torch.nan_to_num(probs, nan=0.0).amax(dim=(1, 2))  # (B, S)
        acc = cache.state.get("delta_acc")
        cache.state["delta_acc"] = best if acc is None or group == 0 else torch.maximum(acc, best)
        if group == len(layer.groups) - 1:
            held = layer.groups[0].lengths[:, 0]  # (B,) rows per sequence (full cache: all equal heads)
            cache.state["delta_rows"] = self._select(cache.state.pop("delta_acc"), held)

    def _select(self, best: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top pages by summed max-head attention plus the recent pages: (rows (B, K), lengths (B,))."""
        b, s = best.shape
        n_pages = math.ceil(s / self.page)
        padded = torch.zeros(b, n_pages * self.page, device=best.device, dtype=best.dtype)
        padded[:, :s] = best
        page_scores = padded.view(b, n_pages, self.page).sum(dim=-1)  # (B, P)
        budget = self.budget(held)  # (B,) tokens attended
        want = torch.ceil(budget.double() / self.page).long().clamp(min=1)  # pages per sequence
        used = torch.ceil(held.double() / self.page).long()  # pages holding tokens
        pidx = torch.arange(n_pages, device=best.device)[None, :]
        recent = (pidx >= used[:, None] - self.recent_pages) & (pidx < used[:, None])
        page_scores = page_scores.masked_fill(recent, float("inf")).masked_fill(pidx >= used[:, None], -1.0)
        k = int(torch.minimum(want, used).max())
        top = page_scores.topk(k, dim=1).indices  # (B, k)
        keep = torch.arange(k, device=best.device)[None, :] < torch.minimum(want, used)[:, None]
        pages = torch.where(keep, top, n_pages + top).sort(dim=1).values  # kept pages first, ascending
        rows = (pages[:, :, None] * self.page + torch.arange(self.page, device=best.device)).flatten(1)
        in_range = (rows < held[:, None]) & (pages[:, :, None] < n_pages).expand(-1, -1, self.page).flatten(1)
        # Valid rows first (ascending), then fillers; lengths count the valid ones.
        order = torch.where(in_range, rows, rows + 10 * n_pages * self.page).sort(dim=1).values
        lengths = in_range.sum(dim=1)
        rows = torch.where(order >= 10 * n_pages * self.page, torch.zeros_like(order), order)
        return rows, lengths
