"""Causal Taylor (Based) linear attention in its quadratic form: fused forward and backward in Triton.

The op, per batch and head, for q, k (T, F), v (T, D), scale = 1 / sqrt(F):

    s_ij  = scale * q_i . k_j,   p_ij = p(s_ij) = 1 + s_ij + s_ij^2 / 2     (j <= i, else p_ij = 0)
    num_i = sum_j p_ij v_j,      den_i = sum_j p_ij,                        o_i = num_i / (den_i + eps)

This is linear attention with the 2nd-order Taylor feature map phi (phi(q) . phi(k) = p(s)),
computed without ever forming the 1 + F + F^2 features: the scores are recomputed tile by tile
from q and k, the way FlashAttention-2 computes softmax attention (Dao, 2023). Two things make
it simpler than softmax: p(s) >= 1/2 everywhere and is a polynomial, so no running maximum or
rescaling is needed (num and den are plain float32 sums), and the normalisation is one division
per row at the end.

- forward: one program per (query block of BLOCK_M rows, batch x head). The query tile stays in
  registers while the key/value tiles up to the diagonal stream past (future blocks are never
  loaded); blocks that every row of the tile sees whole run without the causal mask, only those
  on the diagonal pay for it. Per key tile: s = q k^T (tl.dot), p = 1 + s (1 + s / 2),
  num += p v (tl.dot), den += rowsum(p). den (float32, (B, H, T)) is saved for the backward.
- backward: with R_i = 1 / (den_i + eps) and dO the gradient of o,

      dnum_i = R_i dO_i,   dden_i = -R_i (dO_i . o_i)
      dp_ij  = dnum_i . v_j + dden_i,   ds_ij = dp_ij p'(s_ij) = dp_ij (1 + s_ij)
      dq_i   = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i,   dv_j = sum_i p_ij dnum_i

  The dQ kernel (one program per query block, keys up to the diagonal) runs first and also does
  the per-row preprocessing: it holds the rows' dO and o, so it computes R and dden there and
  stores them (float32, (B, H, T)) for the dK/dV kernel (one program per key block, queries from
  the diagonal to the end), which sums its key block's gradients in registers (no atomics).
  Both recompute s and p from q and k. dO enters the dots as given (16-bit on 16-bit inputs) and
  R is applied to the float32 products, so dnum is never rounded to 16 bits.

Dots take 16-bit operands as they are (tensor cores, float32 accumulation); float32 inputs use
tl.dot's "ieee" precision, not TF32, so the float32 path matches a float32 reference closely.
F and D tiles are padded to powers of two >= 16 (tl.dot's smallest K and N) with masked loads:
the zero columns add nothing to q . k or to p v. Rows past the sequence end are loaded as zeros
and never stored; in the backward their R and dden are zero, so they add nothing to dK and dV.

Layout (B, H, T, F) for q and k, (B, H, T, D) for v and o, any strides with a unit last one.
The host wrappers take validated inputs; the checks live in ``memlab.ops.taylor``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memlab.ops.attention import triton as flash2
from memlab.ops.attention.triton import (
    INTERPRET,
    BwdConfig,
    Config,
    _cast,
    _mma,
    _offset,
    _tile,
    interpreting,
)

__all__ = ["taylor_fwd", "taylor_bwd", "fwd_config", "bwd_config", "POISON_OUTPUTS", "Config", "BwdConfig"]

# Tests set this to fill every buffer a kernel must write with NaN before the launch, so that an
# element the kernel forgets to write shows up instead of passing as stale memory.
POISON_OUTPUTS = False


def new_buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output buffer (NaN-filled when this module's POISON_OUTPUTS is set)."""
    out = flash2.new_buffer(shape, like, dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def padded(n: int) -> int:
    """The tile width for a dimension of n: a power of two >= 16 (tl.dot's smallest K and N)."""
    return max(16, triton.next_power_of_2(n))


def fwd_config(f_pad: int, d_pad: int, interpret: bool) -> Config:
    """Tile sizes of the forward kernel; one fixed small config under the interpreter.

    The accumulator holds BLOCK_M x D float32 values, so wide value heads get fewer rows.
    """
    if interpret:
        return Config(32, 32, 4, 1)
    if d_pad <= 64:
        return Config(64, 64, 4, 3)
    if d_pad <= 128:
        return Config(64, 64, 4, 2)
    return Config(64, 32, 4, 2)


def bwd_config(f_pad: int, d_pad: int, interpret: bool) -> BwdConfig:
    """Tile sizes of the backward kernels (``preprocess_block`` is unused: the dQ kernel does it).

    dkdv: block_m query rows per step, block_n keys held by one program (dK, dV accumulators of
    BLOCK_N x F and BLOCK_N x D float32); dq: block_m query rows held, block_n keys per step.
    """
    if interpret:
        return BwdConfig(Config(32, 32, 4, 1), Config(32, 32, 4, 1))
    if d_pad <= 64:
        return BwdConfig(Config(64, 64, 4, 3), Config(64, 64, 4, 3))
    if d_pad <= 128:
        return BwdConfig(Config(32, 64, 4, 2), Config(64, 32, 4, 2))
    return BwdConfig(Config(32, 32, 4, 2), Config(32, 32, 4, 2))


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """a @ b (+ acc) in float32: "ieee" float32 products for float32 inputs, else tensor cores."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return _mma(a, b, acc, INTERPRET)


@triton.jit
def _taylor(s):
    """p(s) = 1 + s + s^2 / 2 in Horner form (two fused multiply-adds)."""
    return 1.0 + s * (1.0 + 0.5 * s)


@triton.jit
def _load_kv(k_base, v_base, n0, stride_kt, stride_vt, offs_n, offs_f, offs_d, T,
             F: tl.constexpr, D: tl.constexpr):
    """Key rows n0 + offs_n of k (F columns) and v (D columns); zeros past T and in the padding."""
    key_ok = n0 + offs_n < T
    k = tl.load(_tile(k_base, n0, stride_kt, offs_n, offs_f),
                mask=key_ok[:, None] & (offs_f[None, :] < F), other=0.0)
    v = tl.load(_tile(v_base, n0, stride_vt, offs_n, offs_d),
                mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return k, v


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_steps(
    acc, den, q, k_base, v_base, stride_kt, stride_vt,
    blk_start, blk_end, rows, T, scale,
    F: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, FP)
    offs_d = tl.arange(0, DP)
    for blk in range(blk_start, blk_end):
        n0 = blk * BLOCK_N
        kpos = n0 + offs_n
        k, v = _load_kv(k_base, v_base, n0, stride_kt, stride_vt, offs_n, offs_f, offs_d, T, F, D)
        s = _dot(q, tl.trans(k), None, IEEE) * scale
        p = _taylor(s)
        if MASKED:
            # The causal mask also drops keys past the sequence end (loaded as zeros, p = 1
            # there) for every row that is stored.
            p = tl.where(kpos[None, :] <= rows[:, None], p, 0.0)
        den += tl.sum(p, 1)
        acc = _dot(_cast(p, v.dtype, INTERPRET), v, acc, IEEE)
    return acc, den


@triton.jit
def taylor_fwd_kernel(
    Q, K, V, O, DEN,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    T, H, scale, eps,
    F: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """o = num / (den + eps) for one query block of one head; den (B, H, T) float32 stored too.

    Grid (query blocks, B * H).
    """
    # Later query blocks see more keys: start them first to shorten the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, FP)
    offs_d = tl.arange(0, DP)
    rows = m0 + offs_m
    row_ok = rows < T
    q_base = Q + _offset(b, stride_qb, h, stride_qh, 0, 0)
    q = tl.load(_tile(q_base, m0, stride_qt, offs_m, offs_f),
                mask=row_ok[:, None] & (offs_f[None, :] < F), other=0.0)
    k_base = K + _offset(b, stride_kb, h, stride_kh, 0, 0)
    v_base = V + _offset(b, stride_vb, h, stride_vh, 0, 0)

    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Key blocks [0, full) lie at or left of the tile's first row: every row sees them whole.
    hi = tl.cdiv(tl.minimum(m0 + BLOCK_M, T), BLOCK_N)
    full = tl.minimum((m0 + 1) // BLOCK_N, hi)
    acc, den = _fwd_steps(acc, den, q, k_base, v_base, stride_kt, stride_vt, 0, full, rows, T, scale,
                          F, D, FP, DP, BLOCK_N, False, IEEE)
    acc, den = _fwd_steps(acc, den, q, k_base, v_base, stride_kt, stride_vt, full, hi, rows, T, scale,
                          F, D, FP, DP, BLOCK_N, True, IEEE)

    o = acc / (den + eps)[:, None]
    o_base = O + _offset(b, stride_ob, h, stride_oh, 0, 0)
    tl.store(_tile(o_base, m0, stride_ot, offs_m, offs_d), _cast(o, O.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DEN + tl.cast(bh, tl.int64) * T + rows, den, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dq_steps(
    dq, q, do, r, dden, k_base, v_base, stride_kt, stride_vt,
    blk_start, blk_end, rows, T, scale,
    F: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, FP)
    offs_d = tl.arange(0, DP)
    for blk in range(blk_start, blk_end):
        n0 = blk * BLOCK_N
        kpos = n0 + offs_n
        k, v = _load_kv(k_base, v_base, n0, stride_kt, stride_vt, offs_n, offs_f, offs_d, T, F, D)
        s = _dot(q, tl.trans(k), None, IEEE) * scale
        dp = _dot(do, tl.trans(v), None, IEEE) * r[:, None] + dden[:, None]
        ds = dp * (1.0 + s)
        if MASKED:
            ds = tl.where(kpos[None, :] <= rows[:, None], ds, 0.0)
        dq = _dot(_cast(ds, k.dtype, INTERPRET), k, dq, IEEE)
    return dq


@triton.jit
def taylor_bwd_dq_kernel(
    Q, K, V, O, DO, DEN, R, DDEN, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    T, H, scale, eps,
    F: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """dQ for one query block of one head, and the rows' R = 1 / (den + eps), dden = -R dO . o.

    Grid (query blocks, B * H). R and DDEN: (B, H, T) float32, read by the dK/dV kernel.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, FP)
    offs_d = tl.arange(0, DP)
    rows = m0 + offs_m
    row_ok = rows < T
    f_mask = row_ok[:, None] & (offs_f[None, :] < F)
    d_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(_tile(Q + _offset(b, stride_qb, h, stride_qh, 0, 0), m0, stride_qt, offs_m, offs_f),
                mask=f_mask, other=0.0)
    do = tl.load(_tile(DO + _offset(b, stride_dob, h, stride_doh, 0, 0), m0, stride_dot, offs_m, offs_d),
                 mask=d_mask, other=0.0)
    o = tl.load(_tile(O + _offset(b, stride_ob, h, stride_oh, 0, 0), m0, stride_ot, offs_m, offs_d),
                mask=d_mask, other=0.0)
    stat = tl.cast(bh, tl.int64) * T + rows
    den = tl.load(DEN + stat, mask=row_ok, other=1.0)
    r = 1.0 / (den + eps)
    dden = -r * tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(R + stat, r, mask=row_ok)
    tl.store(DDEN + stat, dden, mask=row_ok)

    k_base = K + _offset(b, stride_kb, h, stride_kh, 0, 0)
    v_base = V + _offset(b, stride_vb, h, stride_vh, 0, 0)
    dq = tl.zeros([BLOCK_M, FP], dtype=tl.float32)
    hi = tl.cdiv(tl.minimum(m0 + BLOCK_M, T), BLOCK_N)
    full = tl.minimum((m0 + 1) // BLOCK_N, hi)
    dq = _dq_steps(dq, q, do, r, dden, k_base, v_base, stride_kt, stride_vt, 0, full, rows, T, scale,
                   F, D, FP, DP, BLOCK_N, False, IEEE)
    dq = _dq_steps(dq, q, do, r, dden, k_base, v_base, stride_kt, stride_vt, full, hi, rows, T, scale,
                   F, D, FP, DP, BLOCK_N, True, IEEE)
    dq = dq * scale
    tl.store(_tile(DQ + _offset(b, stride_dqb, h, stride_dqh, 0, 0), m0, stride_dqt, offs_m, offs_f),
             _cast(dq, DQ.dtype.element_ty, INTERPRET), mask=f_mask)


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, q_base, do_base, r_base, dden_base, stride_qt, stride_dot,
    blk_start, blk_end, kpos, T, scale,
    F: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, FP)
    offs_d = tl.arange(0, DP)
    for blk in range(blk_start, blk_end):
        m0 = blk * BLOCK_M
        rows = m0 + offs_m
        row_ok = rows < T
        q = tl.load(_tile(q_base, m0, stride_qt, offs_m, offs_f),
                    mask=row_ok[:, None] & (offs_f[None, :] < F), other=0.0)
        do = tl.load(_tile(do_base, m0, stride_dot, offs_m, offs_d),
                     mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        # Rows past the end read R = dden = 0, which keeps them out of dK and dV.
        r = tl.load(r_base + rows, mask=row_ok, other=0.0)
        dden = tl.load(dden_base + rows, mask=row_ok, other=0.0)
        # Transposed tiles (keys x queries): the sums over queries become row sums of a dot.
        s_t = _dot(k, tl.trans(q), None, IEEE) * scale
        p_t = _taylor(s_t)
        dp_ds = 1.0 + s_t  # p'(s)
        if MASKED:
            vis = kpos[:, None] <= rows[None, :]
            p_t = tl.where(vis, p_t, 0.0)
            dp_ds = tl.where(vis, dp_ds, 0.0)
        dv = _dot(_cast(p_t * r[None, :], do.dtype, INTERPRET), do, dv, IEEE)
        dp_t = _dot(v, tl.trans(do), None, IEEE) * r[None, :] + dden[None, :]
        ds_t = dp_t * dp_ds
        dk = _dot(_cast(ds_t, q.dtype, INTERPRET), q, dk, IEEE)
    return dk, dv


@triton.jit
def taylor_bwd_dkdv_kernel(
    Q, K, V, DO, R, DDEN, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    T, H, scale,
    F: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """dK = scale * sum_i dS_i^T q_i and dV = sum_i P_i^T dnum_i for one key block of one head.

    Grid (key blocks, B * H); needs R and DDEN from the dQ kernel.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n0 = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, FP)
    offs_d = tl.arange(0, DP)
    kpos = n0 + offs_n
    key_ok = kpos < T
    f_mask = key_ok[:, None] & (offs_f[None, :] < F)
    d_mask = key_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(_tile(K + _offset(b, stride_kb, h, stride_kh, 0, 0), n0, stride_kt, offs_n, offs_f),
                mask=f_mask, other=0.0)
    v = tl.load(_tile(V + _offset(b, stride_vb, h, stride_vh, 0, 0), n0, stride_vt, offs_n, offs_d),
                mask=d_mask, other=0.0)
    q_base = Q + _offset(b, stride_qb, h, stride_qh, 0, 0)
    do_base = DO + _offset(b, stride_dob, h, stride_doh, 0, 0)
    r_base = R + tl.cast(bh, tl.int64) * T
    dden_base = DDEN + tl.cast(bh, tl.int64) * T

    dk = tl.zeros([BLOCK_N, FP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    # Query blocks [lo, full) hold rows before some key of the block (causal mask); from
    # ``full`` on every row sees every key. Keys past the end are never stored, so they need no
    # mask; rows past the end carry R = dden = 0.
    lo = n0 // BLOCK_M
    hi = tl.cdiv(T, BLOCK_M)
    full = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M), lo), hi)
    dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, r_base, dden_base, stride_qt, stride_dot,
                         lo, full, kpos, T, scale, F, D, FP, DP, BLOCK_M, True, IEEE)
    dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, r_base, dden_base, stride_qt, stride_dot,
                         full, hi, kpos, T, scale, F, D, FP, DP, BLOCK_M, False, IEEE)
    dk = dk * scale
    tl.store(_tile(DK + _offset(b, stride_dkb, h, stride_dkh, 0, 0), n0, stride_dkt, offs_n, offs_f),
             _cast(dk, DK.dtype.element_ty, INTERPRET), mask=f_mask)
    tl.store(_tile(DV + _offset(b, stride_dvb, h, stride_dvh, 0, 0), n0, stride_dvt, offs_n, offs_d),
             _cast(dv, DV.dtype.element_ty, INTERPRET), mask=d_mask)


# ----------------------------------------------------------------------------------------------
# host wrappers


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, time) strides of a (B, H, T, X) tensor whose last stride is 1."""
    return x.stride(0), x.stride(1), x.stride(2)


def taylor_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float, config: Config | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, H, T, F), v: (B, H, T, D) -> o (B, H, T, D) in v's dtype, den (B, H, T) float32."""
    b, h, t, f = q.shape
    d = v.shape[-1]
    fp, dp = padded(f), padded(d)
    cfg = config or fwd_config(fp, dp, interpreting())
    o = new_buffer(v.shape, v)
    den = new_buffer((b, h, t), v, torch.float32)
    grid = (triton.cdiv(t, cfg.block_m), b * h)
    taylor_fwd_kernel[grid](
        q, k, v, o, den,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        t, h, f ** -0.5, eps,
        F=f, D=d, FP=fp, DP=dp, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, den


def taylor_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    den: torch.Tensor,
    *,
    eps: float,
    config: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk (B, H, T, F), dv (B, H, T, D)) from do (B, H, T, D) and the forward's o, den."""
    b, h, t, f = q.shape
    d = v.shape[-1]
    fp, dp = padded(f), padded(d)
    cfg = config or bwd_config(fp, dp, interpreting())
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = new_buffer(q.shape, q)
    dk = new_buffer(k.shape, k)
    dv = new_buffer(v.shape, v)
    r = new_buffer((b, h, t), den)
    dden = new_buffer((b, h, t), den)
    consts = dict(F=f, D=d, FP=fp, DP=dp, IEEE=q.dtype == torch.float32)
    q_cfg, kv_cfg = cfg.dq, cfg.dkdv
    # The dQ kernel writes R and dden, which the dK/dV kernel reads: it must run first (same stream).
    taylor_bwd_dq_kernel[(triton.cdiv(t, q_cfg.block_m), b * h)](
        q, k, v, o, do, den, r, dden, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dq),
        t, h, f ** -0.5, eps,
        BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n, **consts,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
    )
    taylor_bwd_dkdv_kernel[(triton.cdiv(t, kv_cfg.block_n), b * h)](
        q, k, v, do, r, dden, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        t, h, f ** -0.5,
        BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n, **consts,
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
    )
    return dq, dk, dv
