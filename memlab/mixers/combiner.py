"""Combiner (Ren et al., 2021): full attention support at sub-quadratic cost.

Attention is a conditional expectation A(x_i) = E_{p(j|i)}[v_j] over the support [i] (causal).
Combiner partitions the support of query i into a direct part Omega_i^0, attended as usual, and
regions Omega_i^r, each reached through one abstraction::

    A(x_i) = sum_{j in Omega^0} p(j|i) v_j + sum_r p(Omega^r|i) sum_{j in Omega^r} p(j|Omega^r) v_j

    p(j|i) ~ exp(q_i . k_j / sqrt(D)),  p(Omega^r|i) ~ exp(q_i . k_Omega^r / sqrt(D))   (one softmax)
    p(j|Omega^r) ~ exp(q_Omega^r . k_j / sqrt(D))   (softmax within the region)

with k_Omega and q_Omega the elementwise max-pooling of the region's keys and queries (the
paper's choice). The inner sums (local expectations) do not depend on i, so they are computed
once per region and shared: every earlier position keeps a nonzero weight (full attention
capability) while the cost stays O(L sqrt(L)).

The sequence is laid on an absolute grid of rows of ``span`` positions (row = p // span,
column = p % span; span ~ sqrt(L)). Factorisations (``factorization``):

- ``"fixed"`` (Combiner-Fixed): Omega^0 = the query's row up to itself; each earlier row is one
  region (its summary is ready when the row completes).
- ``"axial"`` (Combiner-Axial, the vertical LM plan): Omega^0 = the query's row up to itself plus
  its column in earlier rows; for every other column r, the region is column r in the rows
  before the query's row, whose max-pooled query and key are prefix maxima down the column.
- ``"mixture"`` (Combiner-Mixture, default): the paper's mixture of factorisation plans,
  A = (A_fixed + A_axial) / 2, which it reports as its best variant.

State: ``pos``; the current (partial) row's queries; for "fixed" only the partial row's keys and
values plus one (key, local expectation) pair per completed row, so the state is
O(L / span + span); "axial" and "mixture" keep every key and value (column-direct attention
needs them), the column prefix maxima, and the current row's column summaries so that a decoding
step costs O(L / span + span) rather than O(L).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.rope import rotary

FACTORIZATIONS = ("fixed", "axial", "mixture")
NEG_INF = float("-inf")


@dataclass(kw_only=True)
class CombinerConfig(MixerConfig):
    n_heads: int = 4
    span: int = 32  # positions per row of the grid; ~ sqrt(sequence length)
    factorization: str = "mixture"  # "fixed", "axial" or "mixture" (mean of the two)
    rope: bool = True
    rope_base: float = 10000.0
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n_heads", "span")
        check_divides(self, "n_heads", "d_model")
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(
                f"CombinerConfig.factorization must be one of {FACTORIZATIONS}, got {self.factorization!r}"
            )
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"CombinerConfig: rope needs an even head dim, got {self.d_model // self.n_heads}"
            )


@register("combiner")
class Combiner(Mixer):
    """Combiner attention: direct attention in a structured support plus max-pooled region summaries."""

    Config = CombinerConfig
    constant_state = False
    test_config = {"n_heads": 2, "span": 4, "factorization": "mixture"}

    def __init__(self, config: CombinerConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads = c.n_heads
        self.head_dim = c.d_model // c.n_heads
        self.use_fixed = c.factorization in ("fixed", "mixture")
        self.use_axial = c.factorization in ("axial", "mixture")
        self.qkv_proj = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        h, d, m = self.n_heads, self.head_dim, self.config.span

        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(batch_size, h, n, d, device=device, dtype=dtype)

        state: State = {"pos": 0, "row_q": zeros(0), "k": zeros(0), "v": zeros(0)}
        if self.use_fixed:
            state.update(sum_k=zeros(0), sum_v=zeros(0))
        if self.use_axial:
            state.update(col_qmax=zeros(m), col_kmax=zeros(m), ax_k=zeros(m), ax_v=zeros(m))
        return state

    def project(self, x: torch.Tensor, pos0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, d_model) at positions pos0.. -> q, k (rotated when rope) and v, each (B, H, T, D)."""
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.config.rope:
            positions = torch.arange(pos0, pos0 + t, device=x.device)
            q = rotary(q, positions, self.config.rope_base)
            k = rotary(k, positions, self.config.rope_base)
        return q, k, v

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        m, h, d = self.config.span, self.n_heads, self.head_dim
        pos0 = state["pos"]
        pos_end = pos0 + t
        r0, c0 = divmod(pos0, m)
        n_rows = (pos_end - 1) // m - r0 + 1  # grid rows touched by this call: r0 .. r0 + n_rows - 1
        q, k, v = self.project(x, pos0)
        pad = n_rows * m - c0 - t
        cached = state["k"].shape[2]

        def grid(before: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return F.pad(torch.cat([before, new], dim=2), (0, 0, 0, pad)).view(b, h, n_rows, m, d)

        g = {
            "q": grid(state["row_q"], q),
            "k": grid(state["k"][:, :, cached - c0 :], k),
            "v": grid(state["v"][:, :, cached - c0 :], v),
        }
        dev = x.device
        valid = (r0 * m + torch.arange(n_rows * m, device=dev)).view(n_rows, m) < pos_end
        # query columns: a single row needs only the new columns (decoding reads O(span), not span^2)
        cols = torch.arange(c0, c0 + t, device=dev) if n_rows == 1 else torch.arange(m, device=dev)
        rows = r0 + torch.arange(n_rows, device=dev)  # absolute row of each grid row
        qq = g["q"][:, :, :, cols]  # (B, H, R, mq, D)
        scale = 1.0 / math.sqrt(d)
        direct = torch.einsum("bhaid,bhajd->bhaij", qq, g["k"]) * scale  # the query's own row
        row_ok = (torch.arange(m, device=dev)[None, None, :] <= cols[None, :, None]) & valid[:, None, :]
        direct = direct.masked_fill(~row_ok, NEG_INF)
        new_state: State = {"pos": pos_end}
        outs = []
        if self.use_fixed:
            outs.append(self._fixed(qq, g, valid, direct, rows, state, new_state))
        if self.use_axial:
            outs.append(self._axial(qq, g, direct, rows, cols, r0, c0, state, new_state))
        o = sum(outs) / len(outs)  # (B, H, R, mq, D)
        o = o[:, :, 0] if n_rows == 1 else o.flatten(2, 3)[:, :, c0 : c0 + t]
        # carry the partial row's queries (and keys/values: all of them for the axial plans)
        done = pos_end // m - r0  # grid rows complete after this call
        tail = pos_end % m
        new_state["row_q"] = g["q"][:, :, done:].flatten(2, 3)[:, :, :tail]
        k_all = torch.cat([state["k"], k], dim=2)
        v_all = torch.cat([state["v"], v], dim=2)
        if not self.use_axial:
            k_all, v_all = k_all[:, :, k_all.shape[2] - tail :], v_all[:, :, v_all.shape[2] - tail :]
        new_state["k"], new_state["v"] = k_all, v_all
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, self.d_model))
        return y, new_state

    def _fixed(
        self,
        qq: torch.Tensor,
        g: dict[str, torch.Tensor],
        valid: torch.Tensor,
        direct: torch.Tensor,
        rows: torch.Tensor,
        state: State,
        new_state: State,
    ) -> torch.Tensor:
        """Combiner-Fixed on the grid: direct attention in the row, one summary per earlier row.

        qq: (B, H, R, mq, D) queries; g: grid q, k, v (B, H, R, span, D); direct: (B, H, R, mq, span)
        masked scores of the row. Returns (B, H, R, mq, D).
        """
        scale = 1.0 / math.sqrt(self.head_dim)
        # region abstraction of each grid row: max-pooled key and query; a row still incomplete at
        # the end of the call is only read by later rows, so its padding never matters
        k_row = g["k"].amax(dim=3)  # (B, H, R, D)
        q_row = g["q"].amax(dim=3)
        inner = torch.einsum("bhad,bhajd->bhaj", q_row, g["k"]) * scale
        inner = torch.softmax(inner.masked_fill(~valid, NEG_INF), dim=-1)
        u_row = torch.einsum("bhaj,bhajd->bhad", inner, g["v"])  # local expectation of each row
        sum_k = torch.cat([state["sum_k"], k_row], dim=2)  # rows 0 .. r0 + R - 1
        sum_v = torch.cat([state["sum_v"], u_row], dim=2)
        summary = torch.einsum("bhaid,bhrd->bhair", qq, sum_k) * scale
        earlier = torch.arange(sum_k.shape[2], device=qq.device)[None, None, :] < rows[:, None, None]
        summary = summary.masked_fill(~earlier, NEG_INF)
        p = torch.softmax(torch.cat([direct, summary], dim=-1), dim=-1)
        m = direct.shape[-1]
        out = torch.einsum("bhaij,bhajd->bhaid", p[..., :m], g["v"])
        out = out + torch.einsum("bhair,bhrd->bhaid", p[..., m:], sum_v)
        done = new_state["pos"] // g["k"].shape[3]  # rows complete after this call
        new_state["sum_k"], new_state["sum_v"] = sum_k[:, :, :done], sum_v[:, :, :done]
        return out

    def _axial(
        self,
        qq: torch.Tensor,
        g: dict[str, torch.Tensor],
        direct: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        r0: int,
        c0: int,
        state: State,
        new_state: State,
    ) -> torch.Tensor:
        """Combiner-Axial (vertical) on the grid: direct attention in the row and in the column
        above, one summary per other column over the rows above. Shapes as ``_fixed``."""
        b, h, n_rows, m, d = g["k"].shape
        scale = 1.0 / math.sqrt(d)
        dev = qq.device
        k_col = torch.cat([state["k"][:, :, : r0 * m].view(b, h, r0, m, d), g["k"]], dim=2)  # (B,H,r0+R,m,D)
        v_col = torch.cat([state["v"][:, :, : r0 * m].view(b, h, r0, m, d), g["v"]], dim=2)
        above = torch.arange(r0 + n_rows, device=dev)[None, None, :] < rows[:, None, None]  # (R, 1, r0+R)
        col = torch.einsum("bhaid,bhrid->bhair", qq, k_col[:, :, :, cols]) * scale
        col = col.masked_fill(~above, NEG_INF)
        # prefix maxima down each column, over all rows up to and including each grid row
        q_inc = torch.cummax(g["q"], dim=2).values
        k_inc = torch.cummax(g["k"], dim=2).values
        if r0 >= 1:
            q_inc = torch.maximum(q_inc, state["col_qmax"][:, :, None])
            k_inc = torch.maximum(k_inc, state["col_kmax"][:, :, None])
        # the current row's summaries were computed by the call that started it
        first = 1 if (c0 > 0 or r0 == 0) else 0
        s_k, s_v = [state["ax_k"][:, :, None]] * first, [state["ax_v"][:, :, None]] * first
        if first < n_rows:
            # region of grid row a, column r: rows above r0 + a in column r; exclusive prefix max
            q_reg = torch.cat([state["col_qmax"][:, :, None], q_inc[:, :, :-1]], dim=2)[:, :, first:]
            k_reg = torch.cat([state["col_kmax"][:, :, None], k_inc[:, :, :-1]], dim=2)[:, :, first:]
            inner = torch.einsum("bhard,bhsrd->bhars", q_reg, k_col) * scale  # (B,H,Ra,m,r0+R)
            inner = inner.masked_fill(~above[first:], NEG_INF)
            s_k.append(k_reg)
            s_v.append(torch.einsum("bhars,bhsrd->bhard", torch.softmax(inner, dim=-1), v_col))
        sum_k, sum_v = torch.cat(s_k, dim=2), torch.cat(s_v, dim=2)  # (B, H, R, m, D)
        summary = torch.einsum("bhaid,bhard->bhair", qq, sum_k) * scale
        other = torch.arange(m, device=dev)[None, None, :] != cols[None, :, None]  # (1, mq, m)
        other = other & (rows >= 1)[:, None, None]  # row 0 has no rows above it
        summary = summary.masked_fill(~other, NEG_INF)
        p = torch.softmax(torch.cat([direct, col, summary], dim=-1), dim=-1)
        n_above = col.shape[-1]
        out = torch.einsum("bhaij,bhajd->bhaid", p[..., :m], g["v"])
        out = out + torch.einsum("bhair,bhrid->bhaid", p[..., m : m + n_above], v_col[:, :, :, cols])
        out = out + torch.einsum("bhair,bhard->bhaid", p[..., m + n_above :], sum_v)
        pos_end = new_state["pos"]
        done = pos_end // m - r0
        new_state["col_qmax"] = q_inc[:, :, done - 1] if done >= 1 else state["col_qmax"]
        new_state["col_kmax"] = k_inc[:, :, done - 1] if done >= 1 else state["col_kmax"]
        # the last row continues in the next call: hand over its summaries (else they are unused)
        keep = 1.0 if pos_end % m else 0.0
        new_state["ax_k"], new_state["ax_v"] = sum_k[:, :, -1] * keep, sum_v[:, :, -1] * keep
        return out
