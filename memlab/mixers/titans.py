"""Titans (Behrouz et al. 2024): a neural long-term memory beside attention, in three variants.

The long-term memory is ``NeuralMemory`` from ``neural_memory`` with Titans' choices: L2
attentional bias ``||M(k) - v||^2``, momentum ("surprise") ``S_t = eta_t S_{t-1} - theta_t grad``,
weight-decay forgetting ``M_t = (1 - alpha_t) M_{t-1} + S_t`` (the keep gate is ``1 - alpha_t``),
all three gates data-dependent; an MLP memory per head trained with the chunked parallel form.
Persistent memory: ``n_persistent`` learned tokens prepended to every attention context (their
keys and values come from the attention's own projections, without a position).

- ``titans_mac`` (memory as context): the sequence is cut into segments of ``chunk_size``. For a
  segment, memory tokens ``h = M(q)`` are read with the segment's queries (memory as of the
  segment's start), attention runs over ``[persistent | h | segment]`` (causal over h and the
  segment), the attention output y is written into the memory when the segment completes, and
  the output is ``y * sigmoid(M(y))``. The paper reads this gate from the memory *after* the
  segment's write, which would let a token see later tokens of its segment; here it is read
  from the memory as of the segment's start so that the mixer stays causal. The memory sees y
  RMS-normalised (as the other variants see the LM's pre-normed x) and its reads (h and the
  gate's) are RMS-normalised per head: y is an input of the memory and h an input of y, so raw,
  a growing memory grew y, which grew the writes (a feedback loop: at init with a delta-rule
  memory, y reached an RMS of 3e4 within 1024 tokens and the LM's gradient 1e4-1e5).
- ``titans_mag`` (memory as gate): sliding-window attention with persistent tokens as prefix,
  and the memory branch on the same input, combined as ``norm(y) * sigmoid(norm(M(x)))``.
- ``titans_mal`` (memory as layer): ``u = x + M(x)`` then sliding-window attention over u with the
  persistent prefix. The residual stands for the residual connection of the paper's separate
  memory layer; without it the attention would see only the memory's reading of x. The read is
  RMS-normalised per head (as in Miras and titans-pytorch): raw, the outer loop grew the memory
  (weights 85 -> 1e4 within 150 CPU passkey steps), u with it, and gradients to 6e5 at 1k tokens.

Persistent tokens are not written into the memory: they are the same for every sequence, so
their writes are absorbed by the memory's learned initial weights.

State: memory weights + momentum + the partial chunk's buffer (fixed size) + conv tails, plus the
last ``window - 1`` keys/values (MAG, MAL) or the partial segment's keys/values (MAC). Bounded.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.assoc_memory import causal_log_mask, chunk_step, mlp_forward
from memlab.mixers.assoc_objectives import (
    DecayRetention,
    LpBias,
)
from memlab.mixers.base import Mixer, State, check_positive, register
from memlab.mixers.neural_memory import (
    AssocMemoryConfig,
    NeuralMemory,
    compiled,
    contiguous_chunks,
    merge_heads,
)
from memlab.mixers.rope import rotary

# Initial gain of the per-head RMSNorm of the memory's reads in MAC and MAL (``_norm_reads``): the
# raw reads of the initial memory have an RMS of ~0.05, and at that size they leave the attention
# free to learn first. At gain 1 the memory tokens, content-free at init, took half of MAC's
# attention mass with full-size values, and a CPU passkey run (L 128, 2 seeds) stayed at chance
# for 270 steps where the unnormalised MAC left it after ~180.
_READ_GAIN_INIT = 0.05


@dataclass(kw_only=True)
class TitansConfig(AssocMemoryConfig):
    """Titans options; for ``titans_mac`` ``chunk_size`` is the segment length."""

    n_persistent: int = 4  # learned persistent-memory tokens in front of every attention context
    rope: bool = True
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        # bool is an int subclass: True would reach torch.randn(True, d) and fail unnamed
        npers = self.n_persistent
        if not isinstance(npers, int) or isinstance(npers, bool) or npers < 0:
            raise ValueError(
                f"{type(self).__name__}.n_persistent must be an int >= 0, got {self.n_persistent!r}"
            )
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"{type(self).__name__}: rope needs an even head dim, got {self.d_model // self.n_heads}"
            )


@dataclass(kw_only=True)
class TitansWindowConfig(TitansConfig):
    window: int = 64  # sliding-window attention: a query at t sees keys in (t - window, t]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "window")


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    window: int,
    n_real: int | None = None,
) -> torch.Tensor:
    """Sliding-window causal attention with an always-visible prefix.

    q, k, v: (B, H, T, D) new tokens; cache_k/v: (B, H, L, D), the L <= window-1 tokens just
    before them; pk, pv: (B, H, P, D) persistent keys/values. Query t sees the prefix and the
    keys at positions (t - window, t]. ``n_real``: how many of the last cache entries are real
    (None: all); earlier slots are unwritten zeros and never attended. Returns (B, H, T, D).
    Long inputs run block by block (blocks of ``window`` queries against 2*window-1 keys), so cost
    and memory are linear in T.
    """
    b, h, t, d = q.shape
    n_cache, n_p, w = cache_k.shape[2], pk.shape[2], window
    n_real = n_cache if n_real is None else min(n_real, n_cache)
    dev = q.device
    if t <= w:
        keys = torch.cat([pk, cache_k, k], dim=2)
        vals = torch.cat([pv, cache_v, v], dim=2)
        kpos = torch.arange(-n_cache, t, device=dev)[None, :]
        qpos = torch.arange(t, device=dev)[:, None]
        local = (kpos <= qpos) & (kpos > qpos - w) & (kpos >= -n_real)
        mask = torch.cat([torch.ones(t, n_p, dtype=torch.bool, device=dev), local], dim=1)
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
    nblk = -(-t // w)
    tp = nblk * w
    pad_left = w - 1 - n_cache

    def padded(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        # (B, H, w-1+tp, D) -> windows (B, H, nblk, 2w-1, D): block i sees padded keys [i*w, i*w+2w-1)
        full = torch.cat(
            [new.new_zeros(b, h, pad_left, d), cache, new, new.new_zeros(b, h, tp - t, d)], dim=2
        )
        return full.unfold(2, 2 * w - 1, w).transpose(-1, -2)

    kw, vw = padded(cache_k, k), padded(cache_v, v)
    a = torch.arange(w, device=dev)[:, None]
    c = torch.arange(2 * w - 1, device=dev)[None, :]
    band = (c >= a) & (c <= a + w - 1)  # (w, 2w-1): key in (t - w, t]
    j = torch.arange(nblk, device=dev)[:, None] * w + c  # padded key index (nblk, 2w-1)
    key_ok = (j >= w - 1 - n_real) & (j < w - 1 + t)
    # Padding queries (past T) may see the zero keys: their rows are dropped, but must stay finite.
    q_pad = (torch.arange(nblk, device=dev)[:, None] * w + a.T) >= t  # (nblk, w)
    mask = band[None] & (key_ok[:, None, :] | q_pad[:, :, None])  # (nblk, w, 2w-1)
    mask = torch.cat([torch.ones(nblk, w, n_p, dtype=torch.bool, device=dev), mask], dim=-1)
    keys = torch.cat([pk[:, :, None].expand(b, h, nblk, n_p, d), kw], dim=3)
    vals = torch.cat([pv[:, :, None].expand(b, h, nblk, n_p, d), vw], dim=3)
    qb = F.pad(q, (0, 0, 0, tp - t)).reshape(b * h, nblk, w, d)
    out = F.scaled_dot_product_attention(
        qb, keys.reshape(b * h, nblk, -1, d), vals.reshape(b * h, nblk, -1, d), attn_mask=mask
    )
    return out.reshape(b, h, tp, d)[:, :, :t]


class _Titans(Mixer):
    """Shared parts: the neural memory, attention projections, persistent tokens."""

    Config = TitansConfig

    def __init__(self, config: TitansConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads = c.n_heads
        self.head_dim = c.d_model // c.n_heads
        self.memory = NeuralMemory.from_config(c, bias=LpBias(2.0), retention=DecayRetention(), momentum=True)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.mem_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.persistent = nn.Parameter(torch.randn(c.n_persistent, c.d_model))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def _rope(self, t: torch.Tensor, start: int) -> torch.Tensor:
        if not self.config.rope:
            return t
        pos = torch.arange(start, start + t.shape[2], device=t.device)
        return rotary(t, pos, self.config.rope_base)

    def _persistent_kv(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the persistent tokens: (B, H, P, D) each, position-free."""
        _, k, v = self.qkv(self.persistent.to(dtype)[None]).chunk(3, dim=-1)
        return (self._split(k).expand(batch, -1, -1, -1), self._split(v).expand(batch, -1, -1, -1))

    def _check_state(self, x: torch.Tensor, state: State | None) -> State:
        self.check_input(x)
        return self.init_state(x.shape[0], x.device, x.dtype) if state is None else dict(state)

    def _norm_reads(self, reads: torch.Tensor) -> torch.Tensor:
        """Memory reads (B, H, T, D) -> per-head RMS-normalised, times the gain ``read_norm``.

        MAC and MAL feed the read into the attention (as tokens, or added to its input), so its
        scale is the memory's, which the outer loop moves by orders of magnitude (see the module
        docstring); normalised, it is bounded whatever the memory weights are (as the Miras
        mixers' reads, and titans-pytorch's post-RMSNorm). ``TitansMAC._segments`` folds the
        gain into the weights after the read instead.
        """
        gain = self.read_norm.view(self.n_heads, 1, self.head_dim).to(reads.dtype)
        return F.rms_norm(reads, (self.head_dim,)) * gain


class _WindowTitans(_Titans):
    """MAG and MAL: sliding-window attention with a persistent prefix and a window KV cache."""

    Config = TitansWindowConfig
    test_config = {"n_heads": 4, "chunk_size": 4, "window": 6, "n_persistent": 2, "mem_expansion": 2}

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        st = self.memory.init_state(batch_size, device, dtype)
        # window - 1 slots from the start (zeros until written, masked by pos): the state is
        # constant-size; a cache that grew up to the window made state bytes depend on prefill length.
        shape = (batch_size, self.n_heads, self.config.window - 1, self.head_dim)
        empty = torch.zeros(shape, device=device, dtype=dtype)
        st.update({"attn.k": empty, "attn.v": empty.clone(), "pos": 0})
        return st

    def _attend(self, u: torch.Tensor, st: State) -> tuple[torch.Tensor, State]:
        """Sliding-window attention over u (B, T, d_model) continuing the cache in st."""
        b, t, _ = u.shape
        q, k, v = (self._split(p) for p in self.qkv(u).chunk(3, dim=-1))
        q, k = self._rope(q, st["pos"]), self._rope(k, st["pos"])
        pk, pv = self._persistent_kv(b, u.dtype)
        ck, cv = st["attn.k"], st["attn.v"]
        y = window_attention(q, k, v, ck, cv, pk, pv, self.config.window, n_real=min(st["pos"], ck.shape[2]))
        keep = self.config.window - 1
        k_all, v_all = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        start = max(k_all.shape[2] - keep, 0)
        st["attn.k"], st["attn.v"] = k_all[:, :, start:], v_all[:, :, start:]
        st["pos"] = st["pos"] + t
        return self.attn_out(merge_heads(y)), st


@register("titans_mag")
class TitansMAG(_WindowTitans):
    """Memory as a gate: ``norm(SWA([persistent | x])) * sigmoid(norm(M(x)))``."""

    def __init__(self, config: TitansWindowConfig) -> None:
        super().__init__(config)
        self.norm_y = nn.Parameter(torch.ones(config.d_model))
        self.norm_m = nn.Parameter(torch.ones(config.d_model))
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        st = self._check_state(x, state)
        d = (self.config.d_model,)
        reads, st = self.memory.scan(x, st)
        m = self.mem_out(merge_heads(reads))
        y, st = self._attend(x, st)
        o = F.rms_norm(y, d, self.norm_y.to(y.dtype)) * torch.sigmoid(
            F.rms_norm(m, d, self.norm_m.to(m.dtype))
        )
        return self.out(o), st


@register("titans_mal")
class TitansMAL(_WindowTitans):
    """Memory as a layer: ``SWA([persistent | x + M(x)])``, the read normalised per head."""

    def __init__(self, config: TitansWindowConfig) -> None:
        super().__init__(config)
        self.read_norm = nn.Parameter(torch.full((config.d_model,), _READ_GAIN_INIT))  # 1-d: no decay

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        st = self._check_state(x, state)
        reads, st = self.memory.scan(x, st)
        u = x + self.mem_out(merge_heads(self._norm_reads(reads)))
        return self._attend(u, st)


@register("titans_mac")
class TitansMAC(_Titans):
    """Memory as context: per segment, attention over [persistent | M(q) | segment]."""

    test_config = {"n_heads": 4, "chunk_size": 4, "n_persistent": 2, "mem_expansion": 2}

    def __init__(self, config: TitansConfig) -> None:
        super().__init__(config)
        self.gate_out = nn.Linear(config.d_model, config.d_model, bias=False)
        # 1-d gains (never weight-decayed): of the memory's reads (h and the gate's) and of the
        # RMSNorm of y before the memory projects it (queries, keys, values, gates).
        self.read_norm = nn.Parameter(torch.full((config.d_model,), _READ_GAIN_INIT))
        self.norm_y = nn.Parameter(torch.ones(config.d_model))

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        st = self.memory.init_state(batch_size, device, dtype)
        # The attention output y is a second stream into the memory (queries for the gate,
        # keys/values for the write); its query conv needs its own tail.
        st["mac.conv_qy"] = self.memory.q_proj.init_state(batch_size, device, dtype)
        seg = torch.zeros(
            batch_size, self.n_heads, self.config.chunk_size, self.head_dim, device=device, dtype=dtype
        )
        for name in ("mac.hk", "mac.hv", "mac.xk", "mac.xv"):
            st[name] = seg.clone()
        return st

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        st = self._check_state(x, state)
        b, t, _ = x.shape
        seg = self.config.chunk_size
        qm, st["mem.conv_q"] = self.memory.queries(x, st["mem.conv_q"])
        xq, xk, xv = (self._split(p) for p in self.qkv(x).chunk(3, dim=-1))
        pk, pv = self._persistent_kv(b, x.dtype)
        outs, i = [], 0
        if st["mem.n"]:  # finish the pending segment through the buffers
            m = min(seg - st["mem.n"], t)
            y, st = self._piece(st, qm, xq, xk, xv, pk, pv, 0, m)
            outs.append(y)
            i = m
        n_full = (t - i) // seg
        if n_full:
            j = i + n_full * seg
            sl = slice(i, j)
            y, st = self._segments(st, qm[:, :, sl], xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], pk, pv)
            outs.append(y)
            i = j
        if i < t:
            y, st = self._piece(st, qm, xq, xk, xv, pk, pv, i, t - i)
            outs.append(y)
        return torch.cat(outs, dim=1), st

    def _piece(
        self,
        st: State,
        qm: torch.Tensor,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        pk: torch.Tensor,
        pv: torch.Tensor,
        i: int,
        m: int,
    ) -> tuple[torch.Tensor, State]:
        """Tokens [i, i + m) of the inputs, within one segment, through the segment buffers."""
        x_dtype, dev = xq.dtype, xq.device
        seg = self.config.chunk_size
        scale = 1.0 / math.sqrt(self.head_dim)
        n = st["mem.n"]
        # memory tokens: the segment's queries read the memory as of the segment's start
        h = self._norm_reads(self.memory.read(st, qm[:, :, i : i + m])).to(x_dtype)
        _, hk, hv = (self._split(p) for p in self.qkv(self.mem_out(merge_heads(h))).chunk(3, dim=-1))
        new = {
            "mac.hk": self._rope(hk, n),
            "mac.hv": hv,
            "mac.xk": self._rope(xk[:, :, i : i + m], n),
            "mac.xv": xv[:, :, i : i + m],
        }
        buf = {
            name: torch.cat([st[name][:, :, :n], val, st[name][:, :, n + m :]], dim=2)
            for name, val in new.items()
        }
        q = self._rope(xq[:, :, i : i + m], n)
        keys = torch.cat([pk, buf["mac.hk"], buf["mac.xk"]], dim=2)
        vals = torch.cat([pv, buf["mac.hv"], buf["mac.xv"]], dim=2)
        seen = torch.arange(seg, device=dev)[None, :] <= torch.arange(n, n + m, device=dev)[:, None]
        mask = torch.cat([torch.ones(m, pk.shape[2], dtype=torch.bool, device=dev), seen, seen], 1)
        y = self.attn_out(
            merge_heads(F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale))
        )
        # the memory sees y RMS-normalised, as the other variants see the LM's pre-normed x
        yn = F.rms_norm(y, (self.config.d_model,), self.norm_y.to(y.dtype))
        # output gate read from the memory as of the segment's start (causal, see docstring)
        qy, st["mac.conv_qy"] = self.memory.queries(yn, st["mac.conv_qy"])
        gate = self.gate_out(merge_heads(self._norm_reads(self.memory.read(st, qy)).to(x_dtype)))
        out = y * torch.sigmoid(gate)
        ky, vy, gy, st["mem.conv_kv"] = self.memory.writes(yn, st["mem.conv_kv"])
        st = self.memory.absorb(st, ky, vy, gy)
        if st["mem.n"] == 0:  # segment complete: its attention context is dropped
            st.update({name: torch.zeros_like(val) for name, val in buf.items()})
        else:
            st.update(buf)
        return out, st

    def _y_projection(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]:
        """The memory's three projections of the attention output y as one matrix.

        Rows: queries, keys of all heads, values of all heads, then the gates grouped by kind
        (log keep, log momentum, step). Returns weight, bias, the merged conv filter (None
        without a conv) and the permutation from the key/value conv's channel order to this one.
        """
        mem = self.memory
        h, d, g = mem.n_heads, mem.head_dim, mem.n_gates
        kv_perm = [hh * 2 * d + half * d + r for half in (0, 1) for hh in range(h) for r in range(d)]
        gate_perm = [hh * g + kind for kind in (0, 2, 1) for hh in range(h)]
        dev = mem.gate_proj.weight.device
        kv_idx = torch.tensor(kv_perm, device=dev)
        gate_idx = torch.tensor(gate_perm, device=dev)
        weight = torch.cat(
            [
                mem.q_proj.proj.weight,
                mem.kv_proj.proj.weight.index_select(0, kv_idx),
                mem.gate_proj.weight.index_select(0, gate_idx),
            ]
        )
        gb = mem.gate_proj.bias
        bias = torch.cat([gb.new_zeros(3 * h * d), gb.index_select(0, gate_idx)])
        conv = None
        if mem.q_proj.kernel > 1:
            conv = torch.cat([mem.q_proj.conv, mem.kv_proj.conv.index_select(0, kv_idx)])
        return weight, bias, conv, kv_perm

    def _segments(
        self,
        st: State,
        qm: torch.Tensor,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        pk: torch.Tensor,
        pv: torch.Tensor,
    ) -> tuple[torch.Tensor, State]:
        """Whole segments (the buffers empty): the same function as ``_piece`` segment by segment.

        What does not depend on the memory is done once for all segments: rotary positions of
        the segment's queries and keys, the attention mask, the merged projection of y (queries,
        keys, values and gates of the memory in one matmul and one conv). The memory runs with
        batch and heads folded into one dim; its reads of y's queries and the forward pass of
        the write share one MLP call.
        """
        mem, core = self.memory, self.memory.core
        b, h, t, d = xq.shape
        x_dtype, dev = xq.dtype, xq.device
        seg = self.config.chunk_size
        n_seg, inner = t // seg, h * d
        sd = st["mem.k"].dtype
        pos = torch.arange(seg, device=dev)

        def rope(u: torch.Tensor) -> torch.Tensor:  # (B, H, C*N, D), every segment at positions 0..N-1
            u = u.reshape(b, h, n_seg, seg, d)
            return (rotary(u, pos, self.config.rope_base) if self.config.rope else u).unbind(2)

        qs, xks = rope(xq), rope(xk)
        xvs = xv.reshape(b, h, n_seg, seg, d).unbind(2)
        qms = qm.to(sd).reshape(b * h, n_seg, seg, d).unbind(1)
        cos = sin = None
        if self.config.rope:
            inv = 1.0 / (
                self.config.rope_base ** (torch.arange(0, d, 2, device=dev, dtype=torch.float64) / d)
            )
            ang = pos.to(torch.float64)[:, None] * inv[None, :]
            cos, sin = ang.cos().to(x_dtype), ang.sin().to(x_dtype)
        causal = pos[None, :] <= pos[:, None]
        mask = torch.cat([torch.ones(seg, pk.shape[2], dtype=torch.bool, device=dev), causal, causal], 1)
        dm = self.config.d_model
        # memory tokens' keys and values: the k, v rows of qkv after mem_out, as one matrix
        # (the read-norm gain folded in: the reads are normalised without a gain in the step)
        w_kv = (self.qkv.weight[dm:] @ (self.mem_out.weight * self.read_norm)).to(x_dtype)
        w_attn = self.attn_out.weight.to(x_dtype)
        w_gate = (self.gate_out.weight * self.read_norm).to(x_dtype)
        upper = causal_log_mask(seg, sd, dev)
        w_y, b_y, conv, kv_perm = self._y_projection()
        # y's RMSNorm gain folded into its projection: the step applies the bare RMSNorm
        w_y, b_y = (w_y * self.norm_y).to(x_dtype), b_y.to(x_dtype)
        if conv is not None:
            conv = conv.to(x_dtype)[:, 0]  # (C, K): depthwise, y[t] = sum_k conv[:, k] x[t + k]
            conv_kv = st["mem.conv_kv"]
            cs = torch.cat([st["mac.conv_qy"].to(x_dtype), conv_kv[..., kv_perm].to(x_dtype)], dim=-1)
        else:
            cs = None
        accs = [st[f"mem.w{i}"].reshape(b * h, *core.shapes[i]) for i in range(core.depth)]
        moms = [st[f"mem.s{i}"].reshape(b * h, *core.shapes[i]) for i in range(core.depth)]
        fixed = {
            "pk": pk, "pv": pv, "mask": mask, "w_kv": w_kv, "w_attn": w_attn, "w_gate": w_gate,
            "w_y": w_y, "b_y": b_y, "conv": conv, "cos": cos, "sin": sin, "upper": upper,
        }  # fmt: skip
        if mem.compiled:  # strides independent of the length (see ``neural_memory.compiled``)
            qms, qs, xks, xvs = map(contiguous_chunks, (qms, qs, xks, xvs))
        step = self._compiled_segment(b, x_dtype) if mem.compiled else self._segment_step
        outs = []
        for j in range(n_seg):
            out, accs, moms, cs = step(accs, moms, cs, qms[j], qs[j], xks[j], xvs[j], fixed)
            outs.append(out)
        st.update({f"mem.w{i}": acc.reshape(b, h, *acc.shape[1:]) for i, acc in enumerate(accs)})
        st.update({f"mem.s{i}": mom.reshape(b, h, *mom.shape[1:]) for i, mom in enumerate(moms)})
        if conv is not None:
            inv_perm = [0] * len(kv_perm)
            for new_i, old_i in enumerate(kv_perm):
                inv_perm[old_i] = new_i
            st["mac.conv_qy"] = cs[..., :inner].to(st["mac.conv_qy"].dtype)
            st["mem.conv_kv"] = cs[..., inner:][..., inv_perm].to(conv_kv.dtype)
        return torch.cat(outs, dim=1), st

    def _compiled_segment(self, batch_size: int, dtype: torch.dtype):  # noqa: ANN202 (bound to self)
        # The memory's ``mem_compile``: the segment is ~150 small ops, launch-bound on a GPU. One
        # compiled copy per static signature (see ``neural_memory.compiled``): dynamo treats self
        # as an input and guards on its config's constants, so layers of one config share it.
        key = (batch_size, repr(self.config), dtype, torch.is_grad_enabled())
        return functools.partial(compiled(TitansMAC._segment_step, key), self)

    def _segment_step(
        self,
        accs: list[torch.Tensor],
        moms: list[torch.Tensor],
        cs: torch.Tensor | None,
        qm: torch.Tensor,
        q: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        fixed: dict[str, torch.Tensor | None],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """One whole segment of ``_segments``: attention over [persistent | memory | segment], the
        output gate, and the memory's write of the attention output.

        accs, moms: the memory's accumulators and momenta, batch and heads folded (B*H, Din, Dout);
        cs (B, K-1, C) the merged conv state of y's projection (None without a conv); qm (B*H, N, D)
        the memory queries in the state dtype; q, xk, xv (B, H, N, D) the segment's rotated queries,
        keys and values; ``fixed`` what ``_segments`` computed once for all segments. Returns the
        output (B, N, d_model) and the new accs, moms and cs.
        """
        mem, core = self.memory, self.memory.core
        b, h, seg, d = q.shape
        dm, inner, kernel = self.config.d_model, h * d, mem.q_proj.kernel
        x_dtype, sd = q.dtype, accs[0].dtype
        cos, sin, conv = fixed["cos"], fixed["sin"], fixed["conv"]
        ws = [core.retention.weights(a) for a in accs]
        hm = F.rms_norm(mlp_forward(ws, qm, core.residual_norm, core.ln_eps)[0], (d,))
        if hm.dtype != x_dtype:
            hm = hm.to(x_dtype)
        hkv = F.linear(hm.view(b, h, seg, d).transpose(1, 2).reshape(b * seg, dm), fixed["w_kv"])
        hk = hkv[:, :dm].view(b, seg, h, d).transpose(1, 2)
        hv = hkv[:, dm:].view(b, seg, h, d).transpose(1, 2)
        if cos is not None:
            h1, h2 = hk[..., : d // 2], hk[..., d // 2 :]
            hk = torch.cat([h1 * cos - h2 * sin, h1 * sin + h2 * cos], dim=-1)
        keys = torch.cat([fixed["pk"], hk, xk], dim=2)
        vals = torch.cat([fixed["pv"], hv, xv], dim=2)
        att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=fixed["mask"], scale=1.0 / math.sqrt(d))
        y = F.linear(att.transpose(1, 2).reshape(b * seg, dm), fixed["w_attn"])  # (B*N, d_model)
        # the memory's projections of RMSNorm(y) (gain folded into w_y): (B, N, 3 inner + 3 H)
        u = F.linear(F.rms_norm(y, (dm,)), fixed["w_y"], fixed["b_y"]).view(b, seg, -1)
        a = u[..., : 3 * inner]
        if conv is not None:
            full = torch.cat([cs, a], dim=1)
            a = (full.unfold(1, kernel, 1) * conv).sum(-1)
            cs = full[:, seg:]
        a = F.silu(a)
        # [queries of y | keys of y] of every (batch, head): one MLP pass at the segment-start memory
        qk_y = F.normalize(a[..., : 2 * inner].reshape(b, seg, 2 * h, d), dim=-1)
        qk_y = qk_y.view(b, seg, 2, h, d).permute(0, 3, 2, 1, 4).reshape(b * h, 2 * seg, d)
        vy = a[..., 2 * inner :].reshape(b, seg, h, d).transpose(1, 2).reshape(b * h, seg, d)
        pre = u[..., 3 * inner :]
        log_g = F.logsigmoid(pre[..., : 2 * h]).view(b, seg, 2, h).permute(2, 0, 3, 1).reshape(2, b * h, seg)
        lr = (mem.lr_max * torch.sigmoid(pre[..., 2 * h :])).transpose(1, 2).reshape(b * h, seg)
        if sd != x_dtype:
            qk_y, vy, log_g, lr = qk_y.to(sd), vy.to(sd), log_g.to(sd), lr.to(sd)
        # y's reads and the write, as one chunk of the shared memory step
        coefs = core.coefs(log_g[0], lr, log_g[1], fixed["upper"])
        read_y, accs, moms = chunk_step(core, accs, moms, qk_y, vy, coefs, None, None)
        read_y = F.rms_norm(read_y, (d,))
        if read_y.dtype != x_dtype:
            read_y = read_y.to(x_dtype)
        gate = F.linear(read_y.view(b, h, seg, d).transpose(1, 2).reshape(b * seg, dm), fixed["w_gate"])
        return (y * torch.sigmoid(gate)).view(b, seg, dm), accs, moms, cs
