"""``cake``: CAKE, Cascading and Adaptive KV cache Eviction with layer preferences (Qin et al. 2025).

Layer preferences. After a layer's prefill, the last ``window`` queries' attention over the older
tokens gives two measures of how much cache the layer wants:
- spatial dispersion H: the entropy of those attention rows (broad attention needs more tokens);
- temporal shift V: the variance, across the window queries, of each token's attention, summed
  over tokens (attention that moves from query to query needs more tokens).
The preference is P = H^(1/tau1) * V^(1/tau2).

Cascading allocation. The total budget is ``n_layers * budget`` tokens per (sequence, KV head).
After layer l, every layer i <= l gets B_i = P_i / sum_{j<=l} P_j * total (capped at what it holds,
the surplus shared by the others) and is evicted down to it at once, so the cache never holds
more than the total plus one layer's prompt: memory is bounded at every step of the prefill, and
after the last layer the budgets sum to the total exactly.

Eviction indicator. A token's score is the mean plus ``gamma`` times the variance of the window
queries' attention to it (tokens whose importance shifts over time are kept), pooled along the
sequence and averaged over the query heads of its KV head; the window itself always stays.
During decoding each layer keeps its allocated budget with the same indicator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memlab.kvcache.policies.base import Observation, Policy, check_nonneg_int, pool1d, register, split_exact

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache


def preference_terms(obs: Observation, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CAKE's spatial dispersion H and temporal shift V of one head group: two (B,) tensors.

    Both use the window queries' attention to the tokens outside the window.
    """
    # (B, G, R, W, S) buffers are updated in place (same values as the plain expressions), so
    # that at most two of them live at once.
    outside = (obs.valid & ~obs.recent(window)).permute(0, 2, 1)[:, :, None, None, :]  # (B, G, 1, 1, S)
    p = obs.window_probs().mul_(outside)  # (B, G, R, W, S)
    entropy = -(p.add(1e-10).log_().mul_(p)).sum(dim=(1, 2, 3, 4))
    n_q = obs.query_valid.sum(dim=1).clamp(min=1).to(p.dtype)  # (B,)
    mean = p.sum(dim=3, keepdim=True) / n_q[:, None, None, None, None]
    qv = obs.query_valid[:, None, None, :, None]
    var = p.sub_(mean).pow_(2).mul_(qv).sum(dim=3) / n_q[:, None, None, None]  # (B, G, R, S)
    return entropy, var.sum(dim=(1, 2, 3))


@register("cake")
@dataclass(kw_only=True)
class CAKE(Policy):
    """``tokens``/``ratio`` is the average per-layer budget; layers split ``n_layers`` times it."""

    window: int = 32
    kernel: int = 5
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0
    compress_decoding: bool = True
    needs_queries = True

    def __post_init__(self) -> None:
        check_nonneg_int("policy 'cake'", window=self.window, kernel=self.kernel)
        if self.window < 1 or self.kernel < 1:
            raise ValueError(
                f"policy 'cake': window and kernel must be >= 1, got {self.window}, {self.kernel}"
            )
        for name in ("gamma", "tau1", "tau2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or (name != "gamma" and value == 0):
                raise ValueError(f"policy 'cake': {name}={value!r} must be a positive number")
        super().__post_init__()

    def protected(self) -> int:
        return self.window

    def query_window(self) -> int:
        return self.window

    def group_budget(
        self, layer: int, n_layers: int, group: int, seen: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        # Prefill budgets come from the cascade in after_layer; decoding keeps what it allocated.
        if not cache.frozen:
            return None
        budgets = cache.state.get("cake_budget", {})
        return budgets.get(layer)

    def select_batch(self, cache: KVCache, indices: torch.Tensor) -> None:
        # Per-sequence layer budgets (B,) and preferences (B,), kept for decoding.
        for key in ("cake_budget", "cake_pref"):
            per_layer = cache.state.get(key, {})
            for layer, t in per_layer.items():
                per_layer[layer] = t.index_select(0, indices.to(t.device))

    def score(self, obs: Observation) -> torch.Tensor:
        probs = obs.window_probs()  # (B, G, R, W, S)
        n_q = obs.query_valid.sum(dim=1).clamp(min=1).to(probs.dtype)[:, None, None, None]
        mean = probs.sum(dim=3) / n_q  # (B, G, R, S)
        qv = obs.query_valid[:, None, None, :, None]
        # In place on the probabilities (not needed after the mean): the same values, one buffer.
        var = probs.sub_(mean[:, :, :, None]).pow_(2).mul_(qv).sum(dim=3) / n_q
        del probs
        indicator = mean + self.gamma * var
        b, g, r, s = indicator.shape
        pooled = pool1d(indicator.permute(0, 3, 1, 2).reshape(b, s, g * r), self.kernel, "avg")
        scores = pooled.view(b, s, g, r).mean(dim=3)
        return scores.masked_fill(obs.recent(self.window), float("inf"))

    def after_layer(self, cache: KVCache, layer: int, phase: str) -> None:
        if phase != "prefill":
            return
        lay = cache.layers[layer]
        # The layer's own softmax scale (the model's ``scaling``, recorded by ``attend``), not
        # head_dim ** -0.5: models such as Granite scale attention otherwise, and CAKE's
        # preferences and scores must use the attention the model computes.
        scale = lay.scale
        h_sum = v_sum = None
        for g in lay.groups:
            h, v = preference_terms(lay.observation(g, scale, phase), self.window)
            h_sum = h if h_sum is None else h_sum + h
            v_sum = v if v_sum is None else v_sum + v
        pref = h_sum.clamp(min=0) ** (1.0 / self.tau1) * v_sum.clamp(min=0) ** (1.0 / self.tau2)
        prefs: dict[int, torch.Tensor] = cache.state.setdefault("cake_pref", {})
        prefs[layer] = pref.double().cpu()
        self.cascade(cache, upto=layer, scale=scale)

    def cascade(self, cache: KVCache, upto: int, scale: float) -> None:
        """Re-split the total budget over layers 0..upto by preference and evict to it.

        ``scale`` is layer ``upto``'s; every layer is scored with its own (``lay.scale``)."""
        prefs: dict[int, torch.Tensor] = cache.state["cake_pref"]
        seen = cache.layers[upto].seen
        # (B,) tokens over all layers. Not capped at the tokens seen: a prompt shorter than the
        # budget leaves a surplus that decoding may fill (see below); the prefill split is the same.
        total = (self.budget(seen, cap=False) * cache.n_layers).tolist()
        held = [cache.layers[i].head_lengths().max(dim=1).values.tolist() for i in range(upto + 1)]
        alloc: list[list[int]] = []
        for bi, tot in enumerate(total):
            weights = [float(prefs[i][bi]) for i in range(upto + 1)]
            caps = [held[i][bi] for i in range(upto + 1)]
            floor = [min(self.window, c) for c in caps]
            # Every layer keeps at least its window; the rest follows the preferences.
            extra = max(min(tot, sum(caps)) - sum(floor), 0)
            if sum(weights) <= 0:
                weights = [1.0] * len(weights)
            shares = split_exact(weights, extra, caps=[c - f for c, f in zip(caps, floor, strict=True)])
            # When the layers hold less than the total (a prompt shorter than the budget), every
            # layer keeps all it holds and the surplus is shared for decoding to grow into: the
            # cached allocation is the decoding budget, and without this a short prompt's
            # decoding evicted each new token at once.
            surplus = split_exact(weights, max(tot - sum(caps), 0))
            alloc.append([f + s + x for f, s, x in zip(floor, shares, surplus, strict=True)])
        budgets: dict[int, Any] = cache.state.setdefault("cake_budget", {})
        for i in range(upto + 1):
            b_i = torch.tensor([a[i] for a in alloc], dtype=torch.int64, device=seen.device)
            budgets[i] = b_i
            lay = cache.layers[i]
            for gi in range(len(lay.groups)):
                lay.shrink(gi, b_i, scale if i == upto else lay.scale, "prefill")
