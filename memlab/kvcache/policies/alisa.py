"""``alisa``: ALISA (Zhao et al. 2024): Sparse Window Attention and a three-phase KV schedule.

Sparse Window Attention (SWA) keeps, per (sequence, KV head), ``budget`` tokens on the device:
- the ``local_fraction`` most recent tokens (locally static);
- the rest by importance, the attention the last ``history`` queries gave each token
  (globally dynamic: importance follows what recent steps attended to, not the whole past).

Three-phase scheduling of where a token's KV lives, as the cache grows:
- Phase I, caching: while a layer holds no more than its budget, everything stays on the device.
- Phase II, offloading: tokens SWA drops move to a host tier (``offload_device``, CPU by default)
  instead of being deleted; every ``refresh`` decoding steps they compete again with the device
  tokens under the current queries and the winners come back to the device.
- Phase III, deleting: beyond ``host_tokens`` per (sequence, KV head) the least important host
  tokens are deleted. (ALISA recomputes deleted KV from activations when they are needed again;
  memlab does not keep activations, so deleted tokens stay deleted: a documented difference.)
``KVCache.nbytes`` counts the device tier; ``host_nbytes(cache)`` the host tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memlab.kvcache.policies.base import Observation, Policy, check_nonneg_int, register

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache
    from memlab.kvcache.head_group import HeadGroup


def host_nbytes(cache: KVCache) -> int:
    """Bytes of keys and values held in ALISA's host tier."""
    out = 0
    for tier in cache.state.get("alisa_host", {}).values():
        out += tier["keys"].numel() * tier["keys"].element_size() * 2
    return out


@register("alisa")
@dataclass(kw_only=True)
class ALISA(Policy):
    local_fraction: float = 0.5
    history: int = 8
    refresh: int = 16
    host_tokens: int | None = None  # None: as many as the device budget
    offload_device: str = "cpu"
    compress_decoding: bool = True
    needs_queries = True

    def __post_init__(self) -> None:
        check_nonneg_int("policy 'alisa'", history=self.history, refresh=self.refresh)
        if self.history < 1 or self.refresh < 1:
            raise ValueError(
                f"policy 'alisa': history and refresh must be >= 1, got {self.history}, {self.refresh}"
            )
        if not isinstance(self.local_fraction, (int, float)) or not 0.0 <= self.local_fraction <= 1.0:
            raise ValueError(f"policy 'alisa': local_fraction={self.local_fraction!r} must be in [0, 1]")
        if self.host_tokens is not None:
            check_nonneg_int("policy 'alisa'", host_tokens=self.host_tokens)
        super().__post_init__()

    def protected(self) -> int:
        return 1

    def query_window(self) -> int:
        return self.history

    def score(self, obs: Observation) -> torch.Tensor:
        if obs.budget is None:
            raise ValueError("alisa scores need the budget")
        probs = obs.window_probs()  # (B, G, R, W, S)
        importance = probs.sum(dim=3).mean(dim=2).permute(0, 2, 1)  # (B, S, G)
        n_local = torch.ceil(obs.budget.double() * self.local_fraction).long().clamp(min=1)  # (B, G)
        local = obs.valid & (obs.positions >= obs.seen[:, None, None] - n_local[:, None, :])
        return importance.masked_fill(local, float("inf"))

    # --- the host tier ---------------------------------------------------------------------
    def _tier(self, cache: KVCache, layer: int, group: int) -> dict[str, Any] | None:
        return cache.state.setdefault("alisa_host", {}).get((layer, group))

    def on_evict(
        self,
        cache: KVCache,
        layer: int,
        group: int,
        g: HeadGroup,
        evicted: torch.Tensor,
        scores: torch.Tensor,
    ) -> None:
        """Phase II/III: move evicted rows (B, S, G) bool to the host tier, keep the best there."""
        n_ev = evicted.sum(dim=1)  # (B, G)
        if int(n_ev.max()) == 0:
            return
        # Gather evicted rows first (ascending), then pad.
        s = evicted.shape[1]
        rows = torch.arange(s, device=evicted.device)[None, :, None].expand_as(evicted)
        order = torch.where(evicted, rows, rows + s).sort(dim=1).values[:, : int(n_ev.max())]
        order = torch.where(order >= s, order - s, order)
        d = g.keys.shape[-1]
        idx4 = order[..., None].expand(*order.shape, d)
        new = {
            "keys": g.keys.gather(1, idx4).to(self.offload_device),
            "values": g.values.gather(1, idx4).to(self.offload_device),
            "positions": g.positions.gather(1, order).to(self.offload_device),
            "scores": scores.float().gather(1, order).to(self.offload_device),
            "lengths": n_ev.to(self.offload_device),
        }
        tier = self._tier(cache, layer, group)
        if tier is not None:
            new = _concat_tiers(tier, new)
        cap = self.host_tokens
        if cap is None:
            # "as many as the device budget": the rows the device keeps after this eviction
            # (g.lengths still counts the evicted rows here).
            cap = int((g.lengths - n_ev).max())
        new = _trim_tier(new, cap)
        cache.state["alisa_host"][(layer, group)] = new

    def refill(self, cache: KVCache, layer: Any, group: int) -> None:
        """Every ``refresh`` decoding steps, host rows rejoin the device rows to be re-scored."""
        tier = self._tier(cache, layer.layer_idx, group)
        if tier is None or int(tier["lengths"].max()) == 0:
            return
        step = int(cache.seen.max() - cache.frozen_seen.max()) if cache.frozen_seen is not None else 0
        if step % self.refresh:
            return
        g = layer.groups[group]
        dev = g.keys.device
        t = tier["keys"].shape[1]
        valid = (torch.arange(t)[None, :, None] < tier["lengths"][:, None, :]).to(dev)  # (B, T, G)
        k, v = tier["keys"].to(dev), tier["values"].to(dev)
        pos = tier["positions"].to(dev)
        _merge_rows(g, k, v, pos, valid)
        del cache.state["alisa_host"][(layer.layer_idx, group)]


def _concat_tiers(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two host tiers into a fresh padded one: per (sequence, head), a's rows then b's.

    One gather per tensor (not a copy per (sequence, head)); unused rows hold zeros (scores
    -inf), as in a fresh tier.
    """
    la, lb = a["lengths"], b["lengths"]  # (B, G)
    total = la + lb
    t = int(total.max())
    ta = a["keys"].shape[1]
    rows = torch.arange(t, device=la.device)[None, :, None]  # (1, T, 1)
    in_use = rows < total[:, None, :]  # (B, T, G)
    # Row of the concatenation [a, b] that lands at each output row (clamped where unused).
    src = torch.where(rows < la[:, None, :], rows, rows - la[:, None, :] + ta)
    src = src.clamp(0, max(ta + b["keys"].shape[1] - 1, 0))
    out = {"lengths": total}
    for name, fill in (("keys", 0.0), ("values", 0.0), ("positions", 0), ("scores", float("-inf"))):
        both = torch.cat([a[name], b[name]], dim=1)
        idx, mask = src, in_use
        if both.dim() == 4:  # keys, values: (B, T, G, D)
            idx, mask = src[..., None].expand(*src.shape, both.shape[-1]), in_use[..., None]
        out[name] = both.gather(1, idx).masked_fill(~mask, fill)
    return out


def _trim_tier(tier: dict[str, Any], cap: int) -> dict[str, Any]:
    """Phase III: keep the ``cap`` most important host rows per (sequence, head)."""
    lengths = tier["lengths"]
    if int(lengths.max()) <= cap:
        return tier
    t = tier["keys"].shape[1]
    valid = torch.arange(t)[None, :, None] < lengths[:, None, :]
    scores = tier["scores"].masked_fill(~valid, float("-inf"))
    top = scores.topk(cap, dim=1).indices.sort(dim=1).values  # (B, cap, G)
    d = tier["keys"].shape[-1]
    return {
        "keys": tier["keys"].gather(1, top[..., None].expand(*top.shape, d)),
        "values": tier["values"].gather(1, top[..., None].expand(*top.shape, d)),
        "positions": tier["positions"].gather(1, top),
        "scores": tier["scores"].gather(1, top),
        "lengths": lengths.clamp(max=cap),
    }


def _merge_rows(
    g: HeadGroup, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor
) -> None:
    """Add host rows to a device group and restore the position order of every (batch, head)."""
    n_add = valid.sum(dim=1)  # (B, G)
    s_old = g.keys.shape[1]
    d = g.keys.shape[-1]
    keys = torch.cat([g.keys, k], dim=1)
    values = torch.cat([g.values, v], dim=1)
    positions = torch.cat([g.positions, pos], dim=1)
    old_valid = torch.arange(s_old, device=k.device)[None, :, None] < g.lengths[:, None, :]
    all_valid = torch.cat([old_valid, valid], dim=1)
    big = positions.max() + 1 if positions.numel() else 0
    order = torch.where(all_valid, positions, positions + big).argsort(dim=1)
    lengths = g.lengths + n_add
    s_new = int(lengths.max())
    order = order[:, :s_new]
    g.keys = keys.gather(1, order[..., None].expand(*order.shape, d))
    g.values = values.gather(1, order[..., None].expand(*order.shape, d))
    g.positions = positions.gather(1, order)
    if g.mass is not None:
        g.mass = torch.cat([g.mass, g.mass.new_zeros(k.shape[:3])], dim=1).gather(1, order)
    g.lengths = lengths
