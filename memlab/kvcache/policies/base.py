"""The KV policy protocol: a dataclass with a budget and one scoring method.

A policy decides, per layer and per (batch, KV head), which cached keys and values stay. The
cache (``memlab.kvcache.cache``) calls it with an ``Observation`` of one head group of one layer:
the stored keys and values with their original positions, the last ``window`` queries of the
layer (already rotated, like the keys), and optional running statistics. The policy returns a
score per stored row; the cache keeps the ``budget`` highest and frees the rest.

Budgets are per (batch, KV head) and per layer, in tokens:
- ``tokens=N``: N tokens;
- ``ratio=r`` (0 < r <= 1): the fraction **kept**, ceil(r * tokens seen) for each sequence of a
  batch. (kvpress's ``compression_ratio`` is the fraction removed: r = 1 - compression_ratio.)
A ratio budget never goes below the tokens the policy always protects (sinks, recent window),
nor above the tokens seen.

``query_aware`` states whether the question was in the compressed context. It is read by the
generation helpers (``memlab.kvcache.generate``): False (the default) compresses the context
before the question arrives, as a cache reused across questions must.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from memlab.registry import Registry, make_config

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache

POLICIES: Registry[type[Policy]] = Registry("kv policy")


@dataclass
class Observation:
    """What a policy sees of one head group of one layer when it scores rows.

    Letters: B batch, S stored rows (padded to the longest (batch, head) of the group), G KV heads
    in the group, R query heads per KV head (GQA group size), W observation window, D head dim.
    """

    layer: int
    n_layers: int
    heads: list[int]  # the KV head indices of this group
    keys: torch.Tensor  # (B, S, G, D), rotated at their original positions
    values: torch.Tensor  # (B, S, G, D)
    positions: torch.Tensor  # (B, S, G) int64 original positions (real-token index)
    lengths: torch.Tensor  # (B, G) int64 rows in use
    seen: torch.Tensor  # (B,) int64 real tokens seen so far by this sequence
    queries: torch.Tensor | None  # (B, W, G * R, D) the last W queries, rotated, or None
    query_valid: torch.Tensor | None  # (B, W) bool
    query_positions: torch.Tensor | None  # (B, W) int64
    mass: torch.Tensor | None  # (B, S, G) float32 attention mass accumulated by the cache, or None
    scale: float
    phase: str  # "prefill" (compressing a prompt chunk) or "decode"
    budget: torch.Tensor | None = None  # (B, G) int64 rows that will be kept, when compressing

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """(B, S, G) bool: which stored rows hold a token (computed once per observation)."""
        s = self.keys.shape[1]
        rows = torch.arange(s, device=self.keys.device)[None, :, None]
        return rows < self.lengths[:, None, :]

    @property
    def group_size(self) -> int:
        if self.queries is None:
            raise ValueError("this observation has no queries")
        return self.queries.shape[2] // self.keys.shape[2]

    def recent(self, n: int) -> torch.Tensor:
        """(B, S, G) bool: rows among the last ``n`` tokens seen (by original position)."""
        return self.valid & (self.positions >= (self.seen[:, None, None] - n))

    def sinks(self, n: int) -> torch.Tensor:
        """(B, S, G) bool: rows among the first ``n`` tokens of the sequence."""
        return self.valid & (self.positions < n)

    def window_probs(self) -> torch.Tensor:
        """Softmax attention of the observation queries over the stored rows.

        Returns (B, G, R, W, S) float32; a query sees rows whose original position is <= its own
        (rows stored after it, e.g. by chunked prefill, are masked), invalid rows and padded
        queries get probability 0.
        """
        if self.queries is None or self.query_valid is None or self.query_positions is None:
            raise ValueError("window_probs needs the observation queries; set needs_queries on the policy")
        b, s, g, d = self.keys.shape
        w = self.queries.shape[1]
        r = self.group_size
        q = self.queries.float().view(b, w, g, r, d).permute(0, 2, 3, 1, 4)  # (B, G, R, W, D)
        k = self.keys.float().permute(0, 2, 3, 1)  # (B, G, D, S)
        # In place where possible, so that one (B, G, R, W, S) float32 buffer lives besides the
        # softmax output (the values are those of the out-of-place expressions).
        logits = torch.matmul(q, k[:, :, None]).mul_(self.scale)  # (B, G, R, W, S)
        del q, k
        kpos = self.positions.permute(0, 2, 1)[:, :, None, None, :]  # (B, G, 1, 1, S)
        qpos = self.query_positions[:, None, None, :, None]  # (B, 1, 1, W, 1)
        visible = self.valid.permute(0, 2, 1)[:, :, None, None, :] & (kpos <= qpos)
        visible = visible & self.query_valid[:, None, None, :, None]
        probs = torch.softmax(logits.masked_fill_(~visible, float("-inf")), dim=-1)
        del logits, visible
        # Rows of a query that sees nothing are all -inf: softmax gives NaN, which means "no vote".
        return probs.nan_to_num_(nan=0.0)


def pool1d(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Smooth scores along the row axis (SnapKV clustering). scores: (B, S, G) -> (B, S, G)."""
    if kernel <= 1:
        return scores
    x = scores.permute(0, 2, 1).reshape(-1, 1, scores.shape[1])  # (B*G, 1, S)
    pad = kernel // 2
    if mode == "max":
        y = torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=pad)
    else:
        y = torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=False)
    y = y[..., : scores.shape[1]]
    return y.reshape(scores.shape[0], scores.shape[2], -1).permute(0, 2, 1)


def check_budget(owner: str, tokens: int | None, ratio: float | None, minimum: int) -> None:
    """ValueError unless exactly one budget is given, ratio in (0, 1] and tokens >= minimum."""
    if (tokens is None) == (ratio is None):
        raise ValueError(
            f"{owner} needs exactly one budget, tokens= or ratio=; got tokens={tokens}, ratio={ratio}"
        )
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"{owner}: ratio={ratio!r} must be in (0, 1], the fraction of tokens kept")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < max(minimum, 1):
            raise ValueError(
                f"{owner}: tokens={tokens!r} must be an int >= {max(minimum, 1)} (the tokens it always keeps)"
            )


def check_nonneg_int(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}: {name}={value!r} must be a non-negative int")


@dataclass(kw_only=True)
class Policy:
    """Base of every KV policy. Subclasses are dataclasses registered with ``@register(name)``.

    Subclasses implement ``score`` (and, for layer- or head-dependent budgets, ``layer_budget``
    or ``head_groups``). Class flags ask the cache for what ``score`` needs:
    ``needs_queries`` keeps the last ``window`` queries per layer; ``needs_mass`` accumulates
    each row's attention mass over every query (H2O).
    """

    tokens: int | None = None
    ratio: float | None = None
    query_aware: bool = False
    compress_decoding: bool = False  # keep the budget during decoding (evict as tokens arrive)

    name: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = False
    needs_mass: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_budget(f"policy {self.name!r}", self.tokens, self.ratio, self.protected())
        if not isinstance(self.query_aware, bool) or not isinstance(self.compress_decoding, bool):
            raise ValueError(
                f"policy {self.name!r}: query_aware and compress_decoding must be bools, got "
                f"{self.query_aware!r}, {self.compress_decoding!r}"
            )

    # --- budgets ---------------------------------------------------------------------------
    def protected(self) -> int:
        """Tokens the policy always keeps (sinks, recent window): the smallest valid budget."""
        return 0

    def query_window(self) -> int:
        """How many recent queries per layer the cache must keep for ``score``."""
        return 0

    def budget(self, seen: torch.Tensor, cap: bool = True) -> torch.Tensor:
        """Tokens kept per (batch, KV head) for a uniform budget. seen: (B,) -> (B,) int64.

        ``cap=False`` (the decoding budget of a frozen prompt of ``seen`` tokens) does not cap
        the budget at ``seen``: a prompt shorter than the budget lets the cache grow up to it
        while decoding, instead of evicting every new token at once."""
        seen = seen.to(torch.int64)
        if self.tokens is not None:
            b = torch.full_like(seen, self.tokens)
        else:
            # ceil in float64 with a small guard so that e.g. 0.3 * 10 keeps 3, not 4.
            b = torch.ceil(seen.double() * float(self.ratio) - 1e-9).to(torch.int64)
            b = b.clamp(min=self.protected())
        return torch.minimum(b, seen) if cap else b

    def layer_budget(self, layer: int, n_layers: int, seen: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Tokens kept per (batch, KV head) in ``layer``. Default: the same in every layer.

        While decoding (``cache.frozen``) the budget is not capped at the prompt's length: with
        the cap, tokens=N on a prompt shorter than N evicted each new token right after it was
        attended (and evicted the recent window that sinks+window policies must keep)."""
        return self.budget(seen, cap=not cache.frozen)

    def head_groups(self, layer: int, n_kv_heads: int) -> list[list[int]]:
        """KV heads that share one storage tensor (and so one padded length). Default: all."""
        return [list(range(n_kv_heads))]

    def group_budget(
        self, layer: int, n_layers: int, group: int, seen: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        """Tokens kept per (batch, head) of one head group; None keeps everything.

        While decoding (``seen`` is then the frozen prompt's count) the cache calls it once per
        frozen prompt and keeps the result: the decoding budget is the one of the prompt."""
        return self.layer_budget(layer, n_layers, seen, cache)

    # --- scoring ---------------------------------------------------------------------------
    def score(self, obs: Observation) -> torch.Tensor:
        """Score every stored row: (B, S, G) float, higher is kept. +inf always kept."""
        raise NotImplementedError

    # --- hooks for policies that act beyond one layer ---------------------------------------
    def after_layer(self, cache: KVCache, layer: int, phase: str) -> None:
        """Called after a layer stored (and compressed) its rows. CAKE cascades budgets here."""

    def on_evict(
        self,
        cache: KVCache,
        layer: int,
        group: int,
        g: Any,
        evicted: torch.Tensor,
        scores: torch.Tensor,
        kept_host: int | None = None,
    ) -> None:
        """Called with the rows (B, S, G) bool about to be evicted from head group ``g`` (ALISA
        moves them to a host tier). ``kept_host``: the rows every (batch, head) keeps, when the
        cache knows it on the host (equal lengths, ``g.uniform``, all above an equal budget), so
        that ``g.uniform - kept_host`` rows are evicted from each without reading the device."""

    def refill(self, cache: KVCache, layer: Any, group: int) -> None:
        """Called before a decoding-time eviction of a head group (ALISA brings rows back)."""

    def select_batch(self, cache: KVCache, indices: torch.Tensor) -> None:
        """Called when the cache keeps rows ``indices`` (N,) of its batch (beam search): policies
        whose ``cache.state`` holds per-sequence tensors select them too."""

    def extra_nbytes(self, cache: KVCache, metadata: bool = False) -> int:
        """Bytes the policy holds outside the cache's layers (ALISA's host tier); with
        ``metadata``, its bookkeeping too. Counted by ``KVCache.held_nbytes``."""
        return 0

    def attention_window(self, layer: int, group: int) -> tuple[int, int] | None:
        """(window, sinks) restricting what a head group's queries read (DuoAttention's
        streaming heads), or None for full causal attention."""
        return None

    def attention_rows(
        self, cache: KVCache, layer: Any, group: int, q: torch.Tensor, scale: float, phase: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows the new queries read, for sparse attention over a kept cache (DELTA).

        q: (B, Tq, G * R, D). Returns (idx (B, K, G), lengths (B, G)) or None for every row held.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """The policy's options, for reports."""
        out: dict[str, Any] = {"policy": self.name}
        for key, value in self.__dict__.items():
            if not key.startswith("_"):
                out[key] = value
        return out


@dataclass(kw_only=True)
class FixedKeepPolicy(Policy):
    """A policy whose budget is implied by its options (e.g. DuoAttention's head split)."""

    def __post_init__(self) -> None:
        if not isinstance(self.query_aware, bool) or not isinstance(self.compress_decoding, bool):
            raise ValueError(f"policy {self.name!r}: query_aware and compress_decoding must be bools")


def register(name: str):
    """Class decorator: add a Policy subclass to ``POLICIES`` under ``name``."""

    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        return POLICIES.register(name)(cls)

    return deco


def build(name: str, *, ratio: float | None = None, tokens: int | None = None, **cfg: Any) -> Policy:
    """Build policy ``name`` with its budget and options; unknown keys raise ValueError."""
    cls = POLICIES.get(name)
    kwargs = dict(cfg)
    if ratio is not None:
        kwargs["ratio"] = ratio
    if tokens is not None:
        kwargs["tokens"] = tokens
    return make_config(cls, f"kv policy {name!r}", kwargs)


def names() -> list[str]:
    return POLICIES.names()


def split_exact(weights: list[float], total: int, caps: list[int] | None = None) -> list[int]:
    """Integers proportional to ``weights`` summing exactly to ``total`` (largest remainder).

    ``caps`` bounds each share; what a capped share cannot take goes to the others in
    proportion to their weights. Raises ValueError when the caps cannot hold ``total``.
    """
    n = len(weights)
    if caps is not None and sum(caps) < total:
        raise ValueError(f"caps {caps} cannot hold a total of {total}")
    out = [0] * n
    free = list(range(n))
    remaining = total
    while free and remaining > 0:
        wsum = sum(max(weights[i], 0.0) for i in free)
        raw = {
            i: (remaining * max(weights[i], 0.0) / wsum if wsum > 0 else remaining / len(free)) for i in free
        }
        over = [i for i in free if caps is not None and out[i] + raw[i] > caps[i]]
        if over:
            # Fill the capped shares first, then share what is left among the others.
            for i in over:
                remaining -= caps[i] - out[i]
                out[i] = caps[i]
            free = [i for i in free if i not in over]
            continue
        floors = {i: math.floor(raw[i]) for i in free}
        for i in free:
            out[i] += floors[i]
        left = remaining - sum(floors.values())
        for i in sorted(free, key=lambda j: raw[j] - floors[j], reverse=True)[:left]:
            out[i] += 1
        remaining = 0
    return out

