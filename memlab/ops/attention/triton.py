"""FlashAttention-2 forward and backward in Triton.

The algorithm is the paper's (Dao, 2023):
- forward: one program per (query block, batch x head), so a single head still fills the GPU;
  the query tile stays in registers while key/value tiles stream past; online softmax keeps a
  running row max m and an *unnormalised* accumulator, rescaled by exp2(m_old - m_new) and
  divided by the row sum l only once at the end; exp2 with scale * log2(e) folded into one
  multiply. The log-sum-exp (base 2) is saved for the backward pass.
- key blocks that no query of the tile can see (causal future, left of the window, between the
  sinks and the window) are never loaded; blocks that every query sees run without any mask;
  only the blocks on a mask edge (diagonal, window edge, sinks, sequence end) pay for the mask.
- backward: delta = rowsum(dO * O) first, then a dK/dV pass (one program per key block and KV
  head, looping over the query heads of its GQA group so their gradients sum in registers) and a
  dQ pass (one program per query block and head). Both recompute P from the saved log-sum-exp.

Layout (B, T, H, D) for q and o, (B, S, Hkv, D) for k and v, any strides with a unit last one.
The host wrappers take validated inputs; checks live in ``memlab.ops.attention``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Stands for "no window" in per-head window tables: larger than any sequence, small enough that
# window arithmetic on int32 cannot overflow.
NO_WINDOW = 1 << 30


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Two bfloat16 faults of Triton's interpreter (triton 3.9), worked around only under it:
# - it stores bfloat16 as uint16 and tl.dot multiplies those raw integers, so dots run on float32
#   copies of their 16-bit operands (the same products the tensor cores form, summed in float32);
# - its float32 -> bfloat16 cast truncates where the GPU rounds to nearest even, so casts add the
#   rounding bias to the bits first.
INTERPRET = tl.constexpr(interpreting())


@triton.jit
def _mma(a, b, acc, INTERP: tl.constexpr):
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    if INTERP:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            # Round to nearest even in the integer domain and clear the low half, so that the
            # truncating cast below is exact.
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# Tests set this to fill every buffer a kernel must write with NaN before the launch, so that an
# element the kernel forgets to write shows up instead of passing as stale memory.
POISON_OUTPUTS = False


def new_buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output buffer (NaN-filled when POISON_OUTPUTS is set)."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    dkdv: Config  # block_m: query rows per step, block_n: keys held by one program
    dq: Config  # block_m: query rows held by one program, block_n: keys per step
    preprocess_block: int = 128


def fwd_config(d: int, causal: bool, interpret: bool) -> Config:
    """Tile sizes of the forward kernel; one fixed config under the interpreter.

    Picked by the sweep of ``benchmarks/flash2.py --mode smoke`` on an H200 (triton 3.6, bf16,
    B=4, S=4096): D=128 (64, 64, 4 warps, 3 stages) 437/500 TFLOP/s causal/full against
    (128, 128, 8, 3) 418/472; D=64 (128, 64, 8, 4) 387/424.
    """
    if interpret:
        return Config(32, 32, 4, 1)
    if d <= 64:
        return Config(128, 64, 8, 4)
    if d <= 128:
        return Config(64, 64, 4, 3)
    return Config(64, 64, 4, 2)


def bwd_config(d: int, interpret: bool) -> BwdConfig:
    """Tile sizes of the backward kernels (same sweep: D=128 344 TFLOP/s, D=64 286, causal)."""
    if interpret:
        return BwdConfig(Config(32, 32, 4, 1), Config(32, 32, 4, 1), 32)
    if d <= 64:
        return BwdConfig(Config(64, 64, 4, 3), Config(128, 64, 8, 3))
    return BwdConfig(Config(64, 128, 8, 2), Config(128, 64, 8, 3))


# ----------------------------------------------------------------------------------------------
# block ranges


@triton.jit
def _key_block_ranges(
    m0, off, S, window, sinks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Key blocks for the query rows m0..m0+BLOCK_M-1 (positions + off).

    Returns (sink_end, lo, a, c, hi): blocks [0, sink_end) hold sink keys left of the window,
    [lo, a) and [c, hi) need the mask, [a, c) are seen whole by every row; the rest is skipped.
    """
    if CAUSAL:
        hi_key = tl.minimum(S, m0 + BLOCK_M + off)
        full_hi_key = tl.minimum(S, m0 + off + 1)
    else:
        hi_key = S
        full_hi_key = S
    hi_key = tl.maximum(hi_key, 0)
    full_hi_key = tl.maximum(full_hi_key, 0)
    hi = tl.cdiv(hi_key, BLOCK_N)
    if HAS_WINDOW:
        lo_key = tl.maximum(m0 + off - window + 1, 0)
        full_lo_key = tl.maximum(m0 + BLOCK_M + off - window, 0)
        lo = tl.minimum(lo_key // BLOCK_N, hi)
        sink_end = tl.minimum(tl.cdiv(tl.minimum(sinks, hi_key), BLOCK_N), lo)
        a = tl.minimum(tl.maximum(tl.cdiv(full_lo_key, BLOCK_N), lo), hi)
    else:
        lo = 0
        sink_end = 0
        a = 0
    c = tl.minimum(tl.maximum(full_hi_key // BLOCK_N, a), hi)
    return sink_end, lo, a, c, hi


@triton.jit
def _query_block_ranges(
    n0, off, T, window, sinks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Query blocks that see some key of n0..n0+BLOCK_N-1: [lo, a) and [c, hi) masked, [a, c) whole."""
    if CAUSAL:
        q_lo = tl.minimum(tl.maximum(n0 - off, 0), T)
        full_lo_row = tl.maximum(n0 + BLOCK_N - 1 - off, 0)
    else:
        q_lo = 0
        full_lo_row = 0
    lo = q_lo // BLOCK_M
    if HAS_WINDOW:
        # Sink keys are seen by every later query, so only a block free of sinks has a last row.
        win_hi = tl.maximum(tl.minimum(T, n0 + BLOCK_N - 1 + window - off), q_lo)
        hi = tl.cdiv(tl.where(n0 >= sinks, win_hi, T), BLOCK_M)
        full_hi = tl.where(n0 + BLOCK_N <= sinks, hi, tl.maximum(n0 + window - off, 0) // BLOCK_M)
    else:
        hi = tl.cdiv(T, BLOCK_M)
        full_hi = hi
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo_row, BLOCK_M), lo), hi)
    c = tl.minimum(tl.maximum(full_hi, a), hi)
    return lo, a, c, hi


@triton.jit
def _offset(b, stride_b, h, stride_h, row, stride_row):
    """b * stride_b + h * stride_h + row * stride_row in 64-bit arithmetic (large tensors)."""
    return (tl.cast(b, tl.int64) * stride_b + tl.cast(h, tl.int64) * stride_h
            + tl.cast(row, tl.int64) * stride_row)


@triton.jit
def _tile(base, row0, stride_row, offs_r, offs_d):
    """Pointers to rows row0 + offs_r (columns offs_d) of a row-major slab with unit column stride."""
    return base + tl.cast(row0, tl.int64) * stride_row + offs_r[:, None] * stride_row + offs_d[None, :]


@triton.jit
def _visible(qpos, kpos, window, sinks, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """qpos: (M, 1) or (1, M); kpos broadcastable. True where the mask lets the query see the key
    (the caller adds the sequence-end bound when the tile can cross it)."""
    vis = kpos >= 0
    if CAUSAL:
        vis = vis & (kpos <= qpos)
    if HAS_WINDOW:
        vis = vis & ((kpos > qpos - window) | (kpos < sinks))
    return vis


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_steps(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
    blk_start, blk_end, qpos, S, window, sinks, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for blk in range(blk_start, blk_end):
        start_n = blk * BLOCK_N
        kpos = start_n + offs_n
        k_ptrs = _tile(k_base, start_n, stride_ks, offs_n, offs_d)
        v_ptrs = _tile(v_base, start_n, stride_vs, offs_n, offs_d)
        if MASKED:
            k = tl.load(k_ptrs, mask=kpos[:, None] < S, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = _mma(q, tl.trans(k), None, INTERPRET)
        if MASKED:
            vis = _visible(qpos[:, None], kpos[None, :], window, sinks, CAUSAL, HAS_WINDOW)
            vis = vis & (kpos[None, :] < S)
            s = tl.where(vis, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen nothing yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=kpos[:, None] < S, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _mma(_cast(p, v.dtype, INTERPRET), v, acc, INTERPRET)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _seq_bounds(CU, b, T, S, VARLEN: tl.constexpr):
    """(row offset of the sequence in the packed tensor, its query length, its key length)."""
    if VARLEN:
        seq0 = tl.load(CU + b)
        seq_len = tl.load(CU + b + 1) - seq0
        return seq0, seq_len, seq_len
    else:
        return 0, T, S


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, CU, HW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, S, H, G, lse_len, qk_scale, window, sinks,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_WINDOWS: tl.constexpr, VARLEN: tl.constexpr,
):
    """o = softmax(q k^T * scale, masked) v and lse2 = log2 sum exp2 of the scaled scores.

    Grid (query blocks, B * H). LSE: (B, H, lse_len) float32, +inf for rows that see no key so
    that the backward pass recomputes P = 0 for them.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G
    if CAUSAL:
        # Causal tiles further down hold more keys: start them first to shorten the tail.
        pid_m = tl.num_programs(0) - 1 - pid_m
    seq0, T_b, S_b = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= T_b:
        return
    if VARLEN:
        batch = 0
    else:
        batch = b
    if HEAD_WINDOWS:
        window = tl.load(HW + h)
    off = S_b - T_b

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = m0 + offs_m
    row_ok = rows < T_b
    q_base = Q + _offset(batch, stride_qb, h, stride_qh, 0, 0)
    q = tl.load(_tile(q_base, seq0 + m0, stride_qt, offs_m, offs_d), mask=row_ok[:, None], other=0.0)
    k_base = K + _offset(batch, stride_kb, kvh, stride_kh, seq0, stride_ks)
    v_base = V + _offset(batch, stride_vb, kvh, stride_vh, seq0, stride_vs)
    qpos = rows + off

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    sink_end, lo, a, c, hi = _key_block_ranges(
        m0, off, S_b, window, sinks, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW
    )
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, 0, sink_end,
                                   qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, True, CAUSAL, HAS_WINDOW)
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, lo, a,
                                   qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, True, CAUSAL, HAS_WINDOW)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, a, c,
                               qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, False, CAUSAL, HAS_WINDOW)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, c, hi,
                               qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, True, CAUSAL, HAS_WINDOW)

    # The deferred normalisation: one division per row at the very end.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = _tile(O + _offset(batch, stride_ob, h, stride_oh, 0, 0), seq0 + m0, stride_ot, offs_m, offs_d)
    tl.store(o_ptrs, _cast(o, O.dtype.element_ty, INTERPRET), mask=row_ok[:, None])
    lse_ptrs = LSE + tl.cast(batch * H + h, tl.int64) * lse_len + seq0 + rows
    tl.store(lse_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    T, H, D: tl.constexpr, BLOCK: tl.constexpr,
):
    """delta[b, h, t] = sum_d dO * O, float32, (B, H, T). Grid (row blocks, B * H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = rows < T
    offs_r = tl.arange(0, BLOCK)
    o_base = O + _offset(b, stride_ob, h, stride_oh, 0, 0)
    do_base = DO + _offset(b, stride_dob, h, stride_doh, 0, 0)
    o = tl.load(_tile(o_base, pid * BLOCK, stride_ot, offs_r, offs_d), mask=ok[:, None], other=0.0)
    do = tl.load(_tile(do_base, pid * BLOCK, stride_dot, offs_r, offs_d), mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + tl.cast(bh, tl.int64) * T + rows, delta, mask=ok)


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, Q, DO, LSE, DELTA, q_off, do_off, stat_off,
    stride_qh, stride_doh, stat_stride_h, stride_qt, stride_dot,
    blk_lo, n_blk, n_heads, kpos, T, off, window, sinks, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Query blocks blk_lo..blk_lo+n_blk-1 of n_heads consecutive query heads, as one flat loop.

    One loop over (head, block) pairs rather than a loop over heads around a loop over blocks:
    nested loops make Triton keep the pipelined inner loop's state across the outer one and
    spill registers (dK and dV already hold 2 * BLOCK_N * D floats). The pair advances by two
    counters: deriving it from the loop index with a division (it // n_blk) made triton 3.6
    generate code that faulted on the H200 (illegal address), while the counters run clean.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    g = n_blk * 0
    blk = blk_lo + n_blk * 0
    for _ in range(n_heads * n_blk):
        m_start = blk * BLOCK_M
        rows = m_start + offs_m
        row_ok = rows < T
        q = tl.load(_tile(Q + q_off + g * stride_qh, m_start, stride_qt, offs_m, offs_d),
                    mask=row_ok[:, None], other=0.0)
        stat = stat_off + g * stat_stride_h + rows
        # lse = +inf outside the sequence makes P = 0 there without a mask.
        lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
        s_t = _mma(k, tl.trans(q), None, INTERPRET)  # (BLOCK_N, BLOCK_M): keys x queries
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            # Keys past the sequence end are never stored, so they need no bound here.
            vis = _visible(rows[None, :] + off, kpos[:, None], window, sinks, CAUSAL, HAS_WINDOW)
            p_t = tl.where(vis, p_t, 0.0)
        do = tl.load(_tile(DO + do_off + g * stride_doh, m_start, stride_dot, offs_m, offs_d),
                     mask=row_ok[:, None], other=0.0)
        dv = _mma(_cast(p_t, do.dtype, INTERPRET), do, dv, INTERPRET)
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        dp_t = _mma(v, tl.trans(do), None, INTERPRET)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(_cast(ds_t, q.dtype, INTERPRET), q, dk, INTERPRET)
        wrap = blk + 1 == blk_lo + n_blk
        g = tl.where(wrap, g + 1, g)
        blk = tl.where(wrap, blk_lo, blk + 1)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, HW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    T, S, H, Hkv, G, lse_len, qk_scale, scale, window, sinks,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_WINDOWS: tl.constexpr, VARLEN: tl.constexpr,
):
    """dK, dV for one key block of one KV head; the G query heads sharing it are summed here.

    Grid (key blocks, B * Hkv). dK = scale * sum_h dS_h^T Q_h, dV = sum_h P_h^T dO_h.
    """
    pid_n = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // Hkv
    kvh = bk % Hkv
    seq0, T_b, S_b = _seq_bounds(CU, b, T, S, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= S_b:
        return
    if VARLEN:
        batch = 0
    else:
        batch = b
    off = S_b - T_b
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kpos = n0 + offs_n
    key_ok = kpos < S_b
    k_base = K + _offset(batch, stride_kb, kvh, stride_kh, 0, 0)
    v_base = V + _offset(batch, stride_vb, kvh, stride_vh, 0, 0)
    k = tl.load(_tile(k_base, seq0 + n0, stride_ks, offs_n, offs_d), mask=key_ok[:, None], other=0.0)
    v = tl.load(_tile(v_base, seq0 + n0, stride_vs, offs_n, offs_d), mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    h0 = kvh * G
    q_off = _offset(batch, stride_qb, h0, stride_qh, seq0, stride_qt)
    do_off = _offset(batch, stride_dob, h0, stride_doh, seq0, stride_dot)
    stat_off = tl.cast(batch * H + h0, tl.int64) * lse_len + seq0
    if HEAD_WINDOWS:
        # Each head of the group has its own window, hence its own query-block ranges.
        for g in range(G):
            w = tl.load(HW + h0 + g)
            lo, a, c, hi = _query_block_ranges(n0, off, T_b, w, sinks, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
            q_g = q_off + g * stride_qh
            do_g = do_off + g * stride_doh
            stat_g = stat_off + g * lse_len
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, q_g, do_g, stat_g,
                                 stride_qh, stride_doh, lse_len, stride_qt, stride_dot, lo, a - lo, 1,
                                 kpos, T_b, off, w, sinks, qk_scale, D, BLOCK_M, True, CAUSAL, HAS_WINDOW)
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, q_g, do_g, stat_g,
                                 stride_qh, stride_doh, lse_len, stride_qt, stride_dot, a, c - a, 1,
                                 kpos, T_b, off, w, sinks, qk_scale, D, BLOCK_M, False, CAUSAL, HAS_WINDOW)
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, q_g, do_g, stat_g,
                                 stride_qh, stride_doh, lse_len, stride_qt, stride_dot, c, hi - c, 1,
                                 kpos, T_b, off, w, sinks, qk_scale, D, BLOCK_M, True, CAUSAL, HAS_WINDOW)
    else:
        lo, a, c, hi = _query_block_ranges(n0, off, T_b, window, sinks, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, q_off, do_off, stat_off,
                             stride_qh, stride_doh, lse_len, stride_qt, stride_dot, lo, a - lo, G,
                             kpos, T_b, off, window, sinks, qk_scale, D, BLOCK_M, True, CAUSAL, HAS_WINDOW)
        dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, q_off, do_off, stat_off,
                             stride_qh, stride_doh, lse_len, stride_qt, stride_dot, a, c - a, G,
                             kpos, T_b, off, window, sinks, qk_scale, D, BLOCK_M, False, CAUSAL, HAS_WINDOW)
        dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, q_off, do_off, stat_off,
                             stride_qh, stride_doh, lse_len, stride_qt, stride_dot, c, hi - c, G,
                             kpos, T_b, off, window, sinks, qk_scale, D, BLOCK_M, True, CAUSAL, HAS_WINDOW)
    dk = dk * scale
    dk_base = DK + _offset(batch, stride_dkb, kvh, stride_dkh, 0, 0)
    dv_base = DV + _offset(batch, stride_dvb, kvh, stride_dvh, 0, 0)
    tl.store(_tile(dk_base, seq0 + n0, stride_dks, offs_n, offs_d), _cast(dk, DK.dtype.element_ty, INTERPRET),
             mask=key_ok[:, None])
    tl.store(_tile(dv_base, seq0 + n0, stride_dvs, offs_n, offs_d), _cast(dv, DV.dtype.element_ty, INTERPRET),
             mask=key_ok[:, None])


@triton.jit
def _dq_steps(
    dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
    blk_start, blk_end, qpos, S, window, sinks, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for blk in range(blk_start, blk_end):
        start_n = blk * BLOCK_N
        kpos = start_n + offs_n
        k_ptrs = _tile(k_base, start_n, stride_ks, offs_n, offs_d)
        v_ptrs = _tile(v_base, start_n, stride_vs, offs_n, offs_d)
        if MASKED:
            k = tl.load(k_ptrs, mask=kpos[:, None] < S, other=0.0)
            v = tl.load(v_ptrs, mask=kpos[:, None] < S, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _mma(q, tl.trans(k), None, INTERPRET)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            vis = _visible(qpos[:, None], kpos[None, :], window, sinks, CAUSAL, HAS_WINDOW)
            p = tl.where(vis & (kpos[None, :] < S), p, 0.0)
        dp = _mma(do, tl.trans(v), None, INTERPRET)
        ds = p * (dp - delta[:, None])
        dq = _mma(_cast(ds, k.dtype, INTERPRET), k, dq, INTERPRET)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, HW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    T, S, H, G, lse_len, qk_scale, scale, window, sinks,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_WINDOWS: tl.constexpr, VARLEN: tl.constexpr,
):
    """dQ = scale * sum_j dS_j K_j for one query block of one head. Grid (query blocks, B * H)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    seq0, T_b, S_b = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= T_b:
        return
    if VARLEN:
        batch = 0
    else:
        batch = b
    if HEAD_WINDOWS:
        window = tl.load(HW + h)
    off = S_b - T_b
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = m0 + offs_m
    row_ok = rows < T_b
    q_base = Q + _offset(batch, stride_qb, h, stride_qh, 0, 0)
    do_base = DO + _offset(batch, stride_dob, h, stride_doh, 0, 0)
    q = tl.load(_tile(q_base, seq0 + m0, stride_qt, offs_m, offs_d), mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile(do_base, seq0 + m0, stride_dot, offs_m, offs_d), mask=row_ok[:, None], other=0.0)
    stat = tl.cast(batch * H + h, tl.int64) * lse_len + seq0 + rows
    lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    k_base = K + _offset(batch, stride_kb, kvh, stride_kh, seq0, stride_ks)
    v_base = V + _offset(batch, stride_vb, kvh, stride_vh, seq0, stride_vs)
    qpos = rows + off
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    sink_end, lo, a, c, hi = _key_block_ranges(
        m0, off, S_b, window, sinks, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW
    )
    if HAS_WINDOW:
        dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, 0, sink_end,
                       qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, True, CAUSAL, HAS_WINDOW)
        dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, lo, a,
                       qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, True, CAUSAL, HAS_WINDOW)
    dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, a, c,
                   qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, False, CAUSAL, HAS_WINDOW)
    dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, c, hi,
                   qpos, S_b, window, sinks, qk_scale, D, BLOCK_N, True, CAUSAL, HAS_WINDOW)
    dq = dq * scale
    dq_base = DQ + _offset(batch, stride_dqb, h, stride_dqh, 0, 0)
    tl.store(_tile(dq_base, seq0 + m0, stride_dqt, offs_m, offs_d), _cast(dq, DQ.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# host wrappers


def _num_sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _window_args(
    window: int | None, head_windows: torch.Tensor | None, device: torch.device
) -> tuple[int, torch.Tensor | None, bool]:
    """(window, per-head window table with NO_WINDOW for -1, whether any window applies)."""
    if head_windows is not None:
        table = head_windows.to(device=device, dtype=torch.int32)
        # Windows above NO_WINDOW mean the same (no sequence is that long) and are clamped: the
        # kernels add window to positions in int32, which a window near 2**31 would overflow.
        table = table.clamp(max=NO_WINDOW)
        table = torch.where(table < 0, torch.full_like(table, NO_WINDOW), table).contiguous()
        return NO_WINDOW, table, True
    if window is not None:
        return min(int(window), NO_WINDOW), None, True
    return NO_WINDOW, None, False


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    window: int | None,
    sinks: int,
    head_windows: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, T, H, D), k, v: (B, S, Hkv, D) -> o (B, T, H, D), lse2 (B, H, T) float32 (base 2).

    With ``cu_seqlens`` B = 1, S = T and ``max_seqlen`` is the longest sequence.
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    cfg = config or fwd_config(d, causal, interpreting())
    o = new_buffer(q.shape, q)
    lse = new_buffer((b, h, t), q, torch.float32)
    win, table, has_window = _window_args(window, head_windows, q.device)
    n_seq = _num_sequences(q, cu_seqlens)
    rows = max_seqlen if cu_seqlens is not None else t
    grid = (triton.cdiv(rows, cfg.block_m), n_seq * h)
    attention_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, table,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        t, s, h, h // hkv, t, scale * LOG2E, win, sinks,
        D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, HAS_WINDOW=has_window, HEAD_WINDOWS=table is not None,
        VARLEN=cu_seqlens is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    window: int | None,
    sinks: int,
    head_windows: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    config: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq (B, T, H, D), dk, dv (B, S, Hkv, D)) from do (B, T, H, D) and the forward's o, lse2."""
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    cfg = config or bwd_config(d, interpreting())
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = new_buffer(q.shape, q)
    dk = new_buffer(k.shape, k)
    dv = new_buffer(v.shape, v)
    delta = new_buffer(lse.shape, lse)
    win, table, has_window = _window_args(window, head_windows, q.device)
    n_seq = _num_sequences(q, cu_seqlens)
    attention_bwd_preprocess_kernel[(triton.cdiv(t, cfg.preprocess_block), b * h)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        t, h, D=d, BLOCK=cfg.preprocess_block,
    )
    flags = dict(CAUSAL=causal, HAS_WINDOW=has_window, HEAD_WINDOWS=table is not None,
                 VARLEN=cu_seqlens is not None)
    keys = max_seqlen if cu_seqlens is not None else s
    rows = max_seqlen if cu_seqlens is not None else t
    kv_cfg, q_cfg = cfg.dkdv, cfg.dq
    attention_bwd_dkdv_kernel[(triton.cdiv(keys, kv_cfg.block_n), n_seq * hkv)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, table,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        t, s, h, hkv, h // hkv, t, scale * LOG2E, scale, win, sinks,
        D=d, BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n, **flags,
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
    )
    attention_bwd_dq_kernel[(triton.cdiv(rows, q_cfg.block_m), n_seq * h)](
        q, k, v, do, lse, delta, dq, cu_seqlens, table,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        t, s, h, h // hkv, t, scale * LOG2E, scale, win, sinks,
        D=d, BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n, **flags,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
    )
    return dq, dk, dv
