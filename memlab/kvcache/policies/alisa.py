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

Host tier storage. Each (layer, head group) has a ``HostTier``: preallocated host buffers that
evicted rows are appended to at every step (one contiguous slice per step, an asynchronous copy
into pinned memory from a CUDA device), so the device tier never holds rows that left it. The
phase-III trim (keep the ``host_tokens`` best rows by their score at eviction) is applied when
the tier is read (refill, or ``tier["keys"]`` etc.) or when its buffer is full: keeping the best
``cap`` of the union once keeps the same rows as trimming after every eviction, since the cap
does not grow meanwhile (a growing cap, as in chunked prefill, trims the rows held first). Ties
go to the row evicted first. With equal lengths over the batch and the rows kept known on the
host (``HeadGroup.uniform`` and the ``kept_host`` the cache passes to ``on_evict``), a decoding
step appends its evicted rows, and a refresh step brings the tier back, without reading the
device; the refresh step is counted on the host (columns seen since the prompt was frozen).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memlab.kvcache.policies.base import Observation, Policy, check_nonneg_int, register

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache
    from memlab.kvcache.head_group import HeadGroup



def host_nbytes(cache: KVCache, metadata: bool = False) -> int:
    """Bytes of keys and values held in ALISA's host tier (its buffers, as allocated); with
    ``metadata``, its positions, scores and row masks too. Reads nothing through the tiers'
    mapping interface, which would trim them."""
    return sum(tier.nbytes(metadata) for tier in cache.state.get("alisa_host", {}).values())


# Per-row fields of a host tier, stored row-major: (C, B, G, D) keys and values, (C, B, G)
# positions and float32 scores (the importance at eviction).
_FIELDS = ("keys", "values", "positions", "scores")


class HostTier(Mapping):
    """ALISA's host tier of one (layer, head group).

    Rows 0..used-1 of the buffers hold, in eviction order, the rows kept by the last trim and
    the rows evicted since (``valid`` (C, B, G) bool marks the rows in use when some (batch,
    head) evicted fewer rows than others; None: all of them). Until it is read, the tier stands
    for the ``cap`` best of these rows per (batch, head).

    As a mapping it reads like a plain tier (and trims first): ``keys``/``values`` (B, C, G, D),
    ``positions``/``scores`` (B, C, G), ``lengths`` (B, G); rows 0..L-1 of each (batch, head)
    are in use, C is the buffer's capacity.
    """

    def __init__(self, slack: int, device: torch.device, pin: bool) -> None:
        self.slack = slack  # rows of room beyond the cap: the rows of ``slack`` steps between trims
        self.device = device
        self.pin = pin
        self.buf: dict[str, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None
        self.used = 0
        self.cap: int | None = None
        self._stream_device: torch.device | None = None  # CUDA device whose copies may be pending

    @property
    def capacity(self) -> int:
        return self.buf["keys"].shape[0] if self.buf else 0

    def nbytes(self, metadata: bool = False) -> int:
        """Bytes of the key and value buffers; with ``metadata``, of every buffer."""
        held = [t for n, t in self.buf.items() if metadata or n in ("keys", "values")]
        if metadata and self.valid is not None:
            held.append(self.valid)
        return sum(t.numel() * t.element_size() for t in held)

    # --- writing ----------------------------------------------------------------------------
    def append(self, block: dict[str, torch.Tensor], valid: torch.Tensor | None, cap: int) -> None:
        """Add evicted rows ``block`` ((n, B, G, ...) per field) and keep ``cap`` rows per head.

        ``valid`` (n, B, G) bool: the rows in use, None for all of them.
        """
        n = block["positions"].shape[0]
        if block["positions"].device.type == "cuda":
            self._stream_device = block["positions"].device
        if cap == 0:
            self.clear()
            return
        if self.cap is not None and cap > self.cap and self.used > self.cap:
            self.compact()  # rows beyond the smaller cap were deleted before this eviction
        self.cap = cap
        if self.used + n > self.capacity:
            if self.used == 0 and n <= cap + self.slack:  # nothing held: fresh buffers
                self._alloc(self._room_for(n, cap), block)
            else:
                self._rebuild(block, valid)
                return
        rows = slice(self.used, self.used + n)
        for name in _FIELDS:
            self.buf[name][rows].copy_(block[name], non_blocking=True)
        if valid is not None or self.valid is not None:
            if self.valid is None:
                self.valid = self._empty(self.capacity, block["positions"].shape[1:], torch.bool)
                self.valid[: self.used] = True  # a fresh buffer: no copy into it is pending
            if valid is None:
                pos = block["positions"]
                valid = torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
            self.valid[rows].copy_(valid, non_blocking=True)
        self.used += n

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` (N,) of every buffer (beam search reorders the cache)."""
        if not self.buf:
            return
        self._wait()
        idx = indices.to(self.device)
        rows = {name: self.buf[name][: self.used].index_select(1, idx) for name in _FIELDS}
        valid = None if self.valid is None else self.valid[: self.used].index_select(1, idx)
        used = self.used
        self._alloc(self.capacity, rows)
        self._store(rows, valid, used)

    def clear(self) -> None:
        """Drop every row (the buffers stay allocated)."""
        self.used = 0
        self.valid = None

    def _empty(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty((rows, *shape), dtype=dtype, device=self.device, pin_memory=self.pin)

    def _room_for(self, rows: int, cap: int) -> int:
        """Buffer rows for ``rows`` held now: up to twice them (at most the cap), plus the slack."""
        return max(rows, min(cap, 2 * rows)) + self.slack

    def _alloc(self, capacity: int, like: dict[str, torch.Tensor]) -> None:
        """Fresh buffers of ``capacity`` rows (the rows held are not kept)."""
        self.buf = {name: self._empty(capacity, like[name].shape[1:], like[name].dtype) for name in _FIELDS}
        self.valid = None
        self.used = 0

    def _rebuild(self, block: dict[str, torch.Tensor], valid: torch.Tensor | None) -> None:
        """The buffer is full: trim the rows held and ``block`` on the host into new buffers."""
        self._wait()
        n = block["positions"].shape[0]
        rows = {}
        for name in _FIELDS:
            new = block[name].to(self.device)
            rows[name] = torch.cat([self.buf[name][: self.used], new]) if self.used else new
        if valid is not None or self.valid is not None:
            shape = block["positions"].shape[1:]
            old = self.valid[: self.used] if self.valid is not None else None
            if old is None:
                old = torch.ones(self.used, *shape, dtype=torch.bool)
            new = valid.to(self.device) if valid is not None else torch.ones(n, *shape, dtype=torch.bool)
            valid = torch.cat([old, new])
        rows, valid, width = _trim(rows, valid, self.cap)
        if valid is not None and bool(valid.all()):
            valid = None
        self._alloc(self._room_for(width, self.cap), rows)
        self._store(rows, valid, width)

    def _store(self, rows: dict[str, torch.Tensor], valid: torch.Tensor | None, width: int) -> None:
        for name in _FIELDS:
            self.buf[name][:width].copy_(rows[name])
        if valid is None:
            self.valid = None
        else:
            if self.valid is None:
                self.valid = self._empty(self.capacity, valid.shape[1:], torch.bool)
            self.valid[:width].copy_(valid)
        self.used = width

    def _wait(self) -> None:
        """Before the host touches the buffers: finish the copies queued into and out of them."""
        if self._stream_device is not None:
            torch.cuda.synchronize(self._stream_device)

    # --- reading ----------------------------------------------------------------------------
    def compact(self) -> None:
        """Apply the pending trim in place (on the host): rows 0..L-1 per (batch, head) in use."""
        if self.used == 0:
            return
        self._wait()
        rows = {name: self.buf[name][: self.used] for name in _FIELDS}
        valid = self.valid[: self.used] if self.valid is not None else None
        trimmed, valid, width = _trim(rows, valid, self.cap)
        if trimmed is rows:
            return
        if valid is not None and bool(valid.all()):
            valid = None
        self._store(trimmed, valid, width)

    def take(self, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:
        """The tier's rows trimmed to ``cap``, on ``device``, and empty the tier.

        Returns (B, W, G, ...) tensors per field, (B, W, G) bool rows in use (None: all) and W,
        all without reading the device when no row is a hole (equal evictions over the batch).
        """
        if device.type == "cuda":
            self._stream_device = device
        rows = {name: self.buf[name][: self.used].to(device, non_blocking=True) for name in _FIELDS}
        valid = None if self.valid is None else self.valid[: self.used].to(device, non_blocking=True)
        rows, valid, width = _trim(rows, valid, self.cap)
        self.clear()
        out = {name: t.transpose(0, 1) for name, t in rows.items()}
        return out, None if valid is None else valid.transpose(0, 1), width

    def lengths(self) -> torch.Tensor:
        """(B, G) int64 rows in use per (batch, head) (before the pending trim)."""
        if self.valid is not None:
            return self.valid[: self.used].sum(dim=0)
        shape = self.buf["positions"].shape[1:] if self.buf else (0, 0)
        return torch.full(shape, self.used, dtype=torch.int64)

    def __getitem__(self, name: str) -> torch.Tensor:
        self.compact()
        if name == "lengths":
            return self.lengths()
        if name not in _FIELDS:
            raise KeyError(name)
        return self.buf[name].transpose(0, 1)

    def __iter__(self) -> Iterator[str]:
        return iter((*_FIELDS, "lengths"))

    def __len__(self) -> int:
        return len(_FIELDS) + 1


def _trim(
    rows: dict[str, torch.Tensor], valid: torch.Tensor | None, cap: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:
    """Phase III: keep the ``cap`` highest-scoring rows in use per (batch, head).

    rows: (R, B, G, ...) per field, in eviction order; valid: (R, B, G) bool or None (all in
    use). Ties go to the earlier row (a stable sort), so trimming a union once keeps what
    trimming after every eviction kept. Returns the kept rows in their order (W, B, G, ...), the
    rows in use (None: all) and W; ``rows`` itself when nothing is dropped. Reads the device
    only when ``valid`` is given.
    """
    r = rows["scores"].shape[0]
    if valid is None and r <= cap:
        return rows, None, r
    order = rows["scores"].sort(dim=0, descending=True, stable=True).indices  # best first
    if valid is None:
        width = cap
        top = order[:cap].sort(dim=0).values
    else:
        first = valid.gather(0, order).to(torch.uint8).sort(dim=0, descending=True, stable=True).indices
        order = order.gather(0, first)  # rows in use first, each part best first
        kept = valid.sum(dim=0).clamp(max=cap)  # (B, G)
        width = int(kept.max()) if kept.numel() else 0
        valid = torch.arange(width, device=order.device)[:, None, None] < kept[None]
        top = torch.where(valid, order[:width], order[:width] + r).sort(dim=0).values
        top = torch.where(top >= r, top - r, top)
    out = {}
    for name, t in rows.items():
        idx = top if t.dim() == 3 else top[..., None].expand(*top.shape, t.shape[-1])
        out[name] = t.gather(0, idx)
    return out, valid, width


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
    def extra_nbytes(self, cache: KVCache, metadata: bool = False) -> int:
        return host_nbytes(cache, metadata)

    def select_batch(self, cache: KVCache, indices: torch.Tensor) -> None:
        for tier in cache.state.get("alisa_host", {}).values():
            tier.select_batch(indices)

    def _tier(self, cache: KVCache, layer: int, group: int) -> HostTier | None:
        return cache.state.setdefault("alisa_host", {}).get((layer, group))

    def after_layer(self, cache: KVCache, layer: int, phase: str) -> None:
        # Columns seen by the prompt: decoding steps are counted from there, on the host.
        if phase == "prefill":
            cache.state.setdefault("alisa_columns", {})[layer] = cache.layers[layer].columns

    def _decode_step(self, cache: KVCache, layer: Any) -> int:
        """Tokens fed since the prompt was frozen (this step's included)."""
        start = cache.state.get("alisa_columns", {}).get(layer.layer_idx)
        if start is None:  # not prefilled through this policy: read the device
            return int(cache.seen.max() - cache.frozen_seen.max()) if cache.frozen_seen is not None else 0
        return layer.columns - start

    def on_evict(
        self,
        cache: KVCache,
        layer: int,
        group: int,
        g: HeadGroup,
        evicted: torch.Tensor,
        scores: torch.Tensor,
        kept_host: int | None = None,
    ) -> None:
        """Phase II/III: move evicted rows (B, S, G) bool to the host tier, keep the best there."""
        n_ev = None
        if kept_host is not None and g.uniform is not None:
            # Known on the host: every (batch, head) evicts the same number of rows, no device read.
            width = g.uniform - kept_host
            cap = kept_host if self.host_tokens is None else self.host_tokens
        else:
            n_ev = evicted.sum(dim=1)  # (B, G)
            width = int(n_ev.max()) if n_ev.numel() else 0
            if width == 0:
                return
            # "as many as the device budget": the rows the device keeps after this eviction
            # (g.lengths still counts the evicted rows here).
            cap = int((g.lengths - n_ev).max()) if self.host_tokens is None else self.host_tokens
        tier = self._tier(cache, layer, group)
        if cap == 0:
            if tier is not None:
                tier.clear()
            return
        # Evicted rows first, in row (so position) order: (W, B, G) row indices.
        idx = evicted.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
        idx = idx[:, :width].transpose(0, 1)
        idx4 = idx[..., None].expand(*idx.shape, g.keys.shape[-1])
        block = {
            "keys": g.keys.transpose(0, 1).gather(0, idx4),
            "values": g.values.transpose(0, 1).gather(0, idx4),
            "positions": g.positions.transpose(0, 1).gather(0, idx),
            "scores": scores.transpose(0, 1).gather(0, idx).float(),
        }
        valid = None
        if n_ev is not None and not bool((n_ev == width).all()):
            valid = torch.arange(width, device=n_ev.device)[:, None, None] < n_ev[None]
        if tier is None:
            dev = torch.device(self.offload_device)
            pin = dev.type == "cpu" and g.keys.device.type == "cuda"
            tier = cache.state["alisa_host"][(layer, group)] = HostTier(self.refresh, dev, pin)
        tier.append(block, valid, cap)

    def refill(self, cache: KVCache, layer: Any, group: int) -> None:
        """Every ``refresh`` decoding steps, host rows rejoin the device rows to be re-scored."""
        tier = self._tier(cache, layer.layer_idx, group)
        if tier is None or tier.used == 0:
            return
        if self._decode_step(cache, layer) % self.refresh:
            return
        g = layer.groups[group]
        rows, valid, width = tier.take(g.keys.device)
        if width:
            _merge_rows(g, rows["keys"], rows["values"], rows["positions"], valid)


def _merge_rows(
    g: HeadGroup, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None
) -> None:
    """Add host rows (B, T, G, ...) to a device group and restore the position order of every
    (batch, head). ``valid`` (B, T, G) bool: the host rows in use, None for all of them; then,
    with the group's lengths equal and known on the host, nothing is read from the device."""
    s_old = g.keys.shape[1]
    t = k.shape[1]
    d = g.keys.shape[-1]
    keys = torch.cat([g.keys, k.to(g.keys.dtype)], dim=1)
    values = torch.cat([g.values, v.to(g.values.dtype)], dim=1)
    positions = torch.cat([g.positions, pos], dim=1)
    if valid is None and g.uniform == s_old:
        # Every (batch, head) holds all its rows: sort them by position (distinct), no masks.
        order = positions.argsort(dim=1)
        lengths, uniform = g.lengths + t, s_old + t
    else:
        if valid is None:
            valid = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)
        old_valid = torch.arange(s_old, device=k.device)[None, :, None] < g.lengths[:, None, :]
        all_valid = torch.cat([old_valid, valid], dim=1)
        big = positions.max() + 1 if positions.numel() else 0
        order = torch.where(all_valid, positions, positions + big).argsort(dim=1)
        lengths, uniform = g.lengths + valid.sum(dim=1), None
        order = order[:, : int(lengths.max())]
    g.keys = keys.gather(1, order[..., None].expand(*order.shape, d))
    g.values = values.gather(1, order[..., None].expand(*order.shape, d))
    g.positions = positions.gather(1, order)
    if g.mass is not None:
        g.mass = torch.cat([g.mass, g.mass.new_zeros(k.shape[:3])], dim=1).gather(1, order)
    g.set_lengths(lengths, uniform)
