"""Head groups: the ragged keys and values of some KV heads of one layer, and row selection.

A layer of ``KVCache`` holds one or more ``HeadGroup`` (a policy may give heads different
budgets); each stores (B, S, G, D) keys and values with a length per (batch, head), rows
0..L-1 in use. ``select_rows`` picks the rows a budget keeps.
"""

from __future__ import annotations

import torch


class HeadGroup:
    """Keys and values of some KV heads of one layer, with a length per (batch, head)."""

    def __init__(self, heads: list[int]) -> None:
        self.heads = heads
        self.keys: torch.Tensor | None = None  # (B, S, G, D)
        self.values: torch.Tensor | None = None  # (B, S, G, D)
        self.positions: torch.Tensor | None = None  # (B, S, G) int64 original positions
        self._lengths: torch.Tensor | None = None  # (B, G) int64
        # The length every (batch, head) holds, when they are all equal and that is known on the
        # host (None: unknown). Decoding steps read it instead of ``lengths``, which would be a
        # device sync per layer and step; assigning ``lengths`` from outside resets it.
        self.uniform: int | None = None
        self.mass: torch.Tensor | None = None  # (B, S, G) float32, accumulated attention
        lo = heads[0] if heads else 0
        # Contiguous heads are taken from a layer's tensors by a view, others by one index_select
        # with a cached index (a list index would build an index tensor at every call).
        self._contiguous = heads == list(range(lo, lo + len(heads)))
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def lengths(self) -> torch.Tensor | None:
        return self._lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor | None) -> None:
        self._lengths = value
        self.uniform = None

    def set_lengths(self, value: torch.Tensor, uniform: int | None) -> None:
        """Set the (B, G) lengths and, when every entry equals it and the caller knows it on the
        host, their common value ``uniform`` (None: unknown, read from the device when needed)."""
        self._lengths = value
        self.uniform = uniform

    def _head_index(self, per_head: int, device: torch.device) -> torch.Tensor:
        idx = self._index.get((per_head, device))
        if idx is None:
            rows = [h * per_head + j for h in self.heads for j in range(per_head)]
            idx = self._index[(per_head, device)] = torch.tensor(rows, device=device)
        return idx

    def take(self, t: torch.Tensor, per_head: int = 1) -> torch.Tensor:
        """This group's heads of ``t`` (B, T, heads * per_head, ...): its KV heads with
        ``per_head=1``, their query heads with ``per_head=R``. A view when the heads are contiguous."""
        n = len(self.heads) * per_head
        if self._contiguous:
            return t if n == t.shape[2] else t.narrow(2, self.heads[0] * per_head, n)
        return t.index_select(2, self._head_index(per_head, t.device))

    def put(self, out: torch.Tensor, value: torch.Tensor, per_head: int = 1) -> None:
        """Write ``value`` into this group's heads of ``out`` (the inverse of ``take``)."""
        if self._contiguous:
            out.narrow(2, self.heads[0] * per_head, len(self.heads) * per_head).copy_(value)
        else:
            out.index_copy_(2, self._head_index(per_head, out.device), value)

    def init(self, b: int, d: int, dtype: torch.dtype, device: torch.device, mass: bool) -> None:
        g = len(self.heads)
        self.keys = torch.zeros(b, 0, g, d, dtype=dtype, device=device)
        self.values = torch.zeros(b, 0, g, d, dtype=dtype, device=device)
        self.positions = torch.zeros(b, 0, g, dtype=torch.int64, device=device)
        self.set_lengths(torch.zeros(b, g, dtype=torch.int64, device=device), 0)
        self.mass = torch.zeros(b, 0, g, dtype=torch.float32, device=device) if mass else None

    @property
    def rows(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def metadata_nbytes(self) -> int:
        out = 0
        for t in (self.positions, self.lengths, self.mass):
            if t is not None:
                out += t.numel() * t.element_size()
        return out

    def append(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None
    ) -> None:
        """Store the valid new tokens after each (batch, head)'s rows.

        k, v: (B, T, G, D); pos: (B, T) int64; valid: (B, T) bool, False for padding, or None
        when every new token is real.
        """
        b, t, g, _ = k.shape
        lengths = self.lengths
        # ``valid`` is None for decoding steps; a one-column prefill chunk may still be padding
        # (``t == 1`` used to take the fast path and store that pad as a row).
        fast = valid is None or bool(valid.all())
        if fast and self.uniform is None and bool((lengths == lengths.flatten()[0]).all()):
            self.uniform = int(lengths.flatten()[0])
        if fast and self.uniform is not None:
            # Common case (no padding, equal lengths): one concatenation, exact allocation.
            n0 = self.uniform
            self.keys = torch.cat([self.keys[:, :n0], k], dim=1)
            self.values = torch.cat([self.values[:, :n0], v], dim=1)
            self.positions = torch.cat([self.positions[:, :n0], pos[:, :, None].expand(b, t, g)], dim=1)
            if self.mass is not None:
                self.mass = torch.cat([self.mass[:, :n0], self.mass.new_zeros(b, t, g)], dim=1)
            self.set_lengths(lengths + t, n0 + t)
            return
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=k.device)
        n_new = valid.sum(dim=1)  # (B,)
        new_lengths = lengths + n_new[:, None]
        s_new = int(new_lengths.max()) if new_lengths.numel() else 0
        self.keys = _resize_rows(self.keys, s_new)
        self.values = _resize_rows(self.values, s_new)
        self.positions = _resize_rows(self.positions, s_new)
        if self.mass is not None:
            self.mass = _resize_rows(self.mass, s_new)
        rank = valid.long().cumsum(dim=1) - 1  # (B, T): index of each valid token among the new
        bi, ti = valid.nonzero(as_tuple=True)  # (N,)
        if bi.numel():
            dest = lengths[bi] + rank[bi, ti][:, None]  # (N, G)
            gi = torch.arange(g, device=k.device)[None, :].expand_as(dest)
            bb = bi[:, None].expand_as(dest)
            self.keys[bb, dest, gi] = k[bi, ti]
            self.values[bb, dest, gi] = v[bi, ti]
            self.positions[bb, dest, gi] = pos[bi, ti][:, None].expand_as(dest)
            if self.mass is not None:
                self.mass[bb, dest, gi] = 0.0
        self.lengths = new_lengths  # unequal in general: ``uniform`` is unknown

    def keep(self, idx: torch.Tensor, lengths: torch.Tensor, uniform: int | None = None) -> None:
        """Keep rows ``idx`` (B, K, G) in that order; ``lengths`` (B, G) of them are in use
        (all equal to ``uniform`` when that is given)."""
        d = self.keys.shape[-1]
        idx4 = idx[..., None].expand(*idx.shape, d)
        self.keys = self.keys.gather(1, idx4)
        self.values = self.values.gather(1, idx4)
        self.positions = self.positions.gather(1, idx)
        if self.mass is not None:
            self.mass = self.mass.gather(1, idx)
        self.set_lengths(lengths, uniform)

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("keys", "values", "positions", "lengths", "mass"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Return ``t`` with exactly ``rows`` rows along dim 1 (zero-filled when growing)."""
    if t.shape[1] == rows:
        return t
    if t.shape[1] > rows:
        return t[:, :rows].contiguous()
    pad = t.new_zeros(t.shape[0], rows - t.shape[1], *t.shape[2:])
    return torch.cat([t, pad], dim=1)


def select_rows(
    scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, kept_max: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to keep: the ``budget`` highest scores per (batch, head), in row order.

    scores: (B, S, G); valid: (B, S, G) bool; budget: (B,) or (B, G) int64. ``kept_max``: the
    largest number of rows kept, when the caller knows it on the host (saves a device sync).
    Returns idx (B, K, G) with the kept rows first (ascending) and lengths (B, G).
    """
    b, s, g = scores.shape
    if budget.dim() == 1:
        budget = budget[:, None].expand(b, g)
    lengths = valid.sum(dim=1)
    kept = torch.minimum(budget, lengths)
    if kept_max is not None:
        k = kept_max
    else:
        k = int(kept.max()) if kept.numel() else 0
    scores = scores.float().masked_fill(~valid, float("-inf"))
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    # A stable sort, not topk: ties (max pooling makes many) go to the earlier row, the same
    # choice whatever the padded shape of the batch, so a padded batch equals its rows alone.
    top = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, K, G), best first
    rank = torch.arange(k, device=scores.device)[None, :, None]
    in_use = rank < kept[:, None, :]
    # Kept rows first in row order (their positions stay sorted), unused slots after them.
    order = torch.where(in_use, top, top + s).sort(dim=1).values
    idx = torch.where(order >= s, order - s, order)
    return idx, kept


def stack_heads(groups: list[HeadGroup], name: str) -> torch.Tensor | None:
    """One tensor over all KV heads (in head order) from a layer's groups' ``name`` tensors."""
    parts = [getattr(g, name) for g in groups]
    if any(p is None for p in parts):
        return None
    rows = max(p.shape[1] for p in parts) if name != "lengths" else 0
    if name != "lengths":
        parts = [_resize_rows(p, rows) for p in parts]
    dim = 1 if name == "lengths" else 2
    heads = [h for g in groups for h in g.heads]
    out = torch.cat(parts, dim=dim)
    order = torch.tensor(sorted(range(len(heads)), key=lambda i: heads[i]), device=out.device)
    return out.index_select(dim, order)
