"""Fused selective scan (Mamba-1, S6) in Triton: forward and backward with the state in registers.

The recurrence, per batch b, channel c and state n (see ``reference.py``):

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t x_t,   y_t = C_t . h_t + D x_t,   y_t *= silu(z_t)

Forward: one program per (block of BLOCK_D channels, batch row). It walks the T steps in order
with its (BLOCK_D, N) float32 state in registers; each step reads BLOCK_D values of x, delta
(and z) and N values of B and C, and writes BLOCK_D values of y. The state is never written per
step: only at chunk boundaries (every CHUNK steps) into a (batch, n_chunks + 1, d, N) float32
buffer (entry 0 the initial state, entry n_chunks the final one), which is all the backward
pass keeps.

Backward: the same grid; each program walks the chunks from last to first. For a chunk it
recomputes the states from the chunk's stored boundary state, writing the state *before* each
step into a per-program scratch slab (CHUNK, BLOCK_D, N) (on a GPU it stays in L1/L2), then runs
the reverse recurrence over the chunk. With g_t = dy_t * silu(z_t) the gradient reaching the
un-gated output, and G_t the total gradient of the loss with respect to h_t,

    G_T     = C_T g_T + dh_T                            (dh_T: the gradient of the final state)
    G_{t-1} = C_{t-1} g_{t-1} + a_t G_t,                a_t = exp(delta_t A)
    dh0     = a_1 G_1

and each step's local derivatives (h_t = a_t h_{t-1} + delta_t B_t x_t):

    dx_t[c]     = D[c] g_t[c] + delta_t[c] sum_n G_t[c, n] B_t[n]
    ddelta_t[c] = x_t[c] sum_n G_t[c, n] B_t[n] + sum_n G_t[c, n] a_t[c, n] h_{t-1}[c, n] A[c, n]
    dA[c, n]   += G_t[c, n] a_t[c, n] h_{t-1}[c, n] delta_t[c]       (summed over batch and time)
    dB_t[n]    += sum_c G_t[c, n] delta_t[c] x_t[c]                 (summed over channels)
    dC_t[n]    += sum_c g_t[c] h_t[c, n]                            (summed over channels)
    dD[c]      += g_t[c] x_t[c]
    dz_t[c]     = dy_t[c] ys_t[c] sigmoid(z)(1 + z (1 - sigmoid(z)))  (ys_t: the un-gated y_t)

Sums over channels are first taken over a program's channel block and written to a
(batch, channel blocks, T, N) float32 buffer that the host sums (no atomics: deterministic);
dA and dD are accumulated in registers over time and written per batch row, summed on the host.

Layout: x, delta, z, y: (batch, T, d); B, C: (batch, T, N); any strides with a unit last one.
A: (d, N), D: (d,), h0: (batch, d, N) contiguous. All arithmetic is float32; the decay uses exp2
with A pre-multiplied by log2(e). The host wrappers take validated inputs; the checks live in
``memlab.ops.scan``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton's interpreter (triton 3.9) casts float32 -> bfloat16 by truncation where the GPU rounds
# to nearest even; under it, casts to bfloat16 first round in the integer domain.
INTERPRET = tl.constexpr(interpreting())

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
    chunk: int  # time steps between stored states
    block_d: int  # channels per program
    num_warps: int


def scan_config(batch: int, d: int, n_pad: int, interpret: bool) -> Config:
    """Tile sizes. Programs are latency-bound walks over time, so the channel block is kept small
    enough that batch x channel blocks fills the GPU (a few programs per SM) and the state
    (BLOCK_D x N floats, a handful of such tiles live in the backward) fits in registers."""
    if interpret:
        return Config(64, 8, 1)
    block_d = max(16, min(128, 4096 // n_pad))
    while block_d > 16 and batch * triton.cdiv(d, block_d) < 4 * 132:
        block_d //= 2
    num_warps = 4 if block_d * n_pad >= 2048 else (2 if block_d * n_pad >= 512 else 1)
    return Config(64, block_d, num_warps)


@triton.jit
def _store_cast(ptr, value, mask, INTERP: tl.constexpr):
    """Store a float32 value in the pointer's element type, rounding to nearest even."""
    dtype = ptr.dtype.element_ty
    if INTERP:
        if dtype == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            # Add half an ulp of bfloat16 (ties to even) and clear the low half: the truncating
            # cast that follows is then exact.
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    tl.store(ptr, value.to(dtype), mask=mask)


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def scan_fwd_kernel(
    X, DT, A, BM, CM, DSKIP, Z, H0, Y, HS,
    stride_xb, stride_xt, stride_dtb, stride_dtt, stride_bb, stride_bt, stride_cb, stride_ct,
    stride_zb, stride_zt, stride_yb, stride_yt,
    T, d, N, n_chunks, n_saved,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE_CHUNKS: tl.constexpr,
):
    """y (batch, T, d) and the states HS (batch, n_saved, d, N) float32: with SAVE_CHUNKS entry k
    is the state after k * CHUNK steps (entry n_chunks after all T); otherwise entry 0 is h_T.

    Grid (channel blocks, batch)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_off = offs_d[:, None] * N + offs_n[None, :]

    a2 = tl.load(A + state_off, mask=mask_dn, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_D:
        dskip = tl.load(DSKIP + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_base = X + b * stride_xb + offs_d
    dt_base = DT + b * stride_dtb + offs_d
    b_base = BM + b * stride_bb + offs_n
    c_base = CM + b * stride_cb + offs_n
    z_base = Z + b * stride_zb + offs_d
    y_base = Y + b * stride_yb + offs_d
    hs_base = HS + b * n_saved * d * N + state_off

    if HAS_H0:
        h = tl.load(H0 + b * d * N + state_off, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if SAVE_CHUNKS:
        tl.store(hs_base, h, mask=mask_dn)

    for k in range(0, n_chunks):
        t0 = k * CHUNK
        t1 = tl.minimum(t0 + CHUNK, T)
        for t in range(t0, t1):
            t64 = tl.cast(t, tl.int64)
            x = tl.load(x_base + t64 * stride_xt, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_base + t64 * stride_dtt, mask=mask_d, other=0.0).to(tl.float32)
            bv = tl.load(b_base + t64 * stride_bt, mask=mask_n, other=0.0).to(tl.float32)
            cv = tl.load(c_base + t64 * stride_ct, mask=mask_n, other=0.0).to(tl.float32)
            decay = tl.math.exp2(dt[:, None] * a2)
            h = decay * h + (dt * x)[:, None] * bv[None, :]
            y = tl.sum(h * cv[None, :], 1)
            if HAS_D:
                y += dskip * x
            if HAS_Z:
                zv = tl.load(z_base + t64 * stride_zt, mask=mask_d, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            _store_cast(y_base + t64 * stride_yt, y, mask_d, INTERPRET)
        if SAVE_CHUNKS:
            tl.store(hs_base + (k + 1) * d * N, h, mask=mask_dn)
    if not SAVE_CHUNKS:
        tl.store(hs_base, h, mask=mask_dn)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def scan_bwd_kernel(
    X, DT, A, BM, CM, DSKIP, Z, DY, DHT, HS, SCR,
    DX, DDT, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DH0,
    stride_xb, stride_xt, stride_dtb, stride_dtt, stride_bb, stride_bt, stride_cb, stride_ct,
    stride_zb, stride_zt, stride_dyb, stride_dyt,
    T, d, N, n_chunks, n_dblocks,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DHT: tl.constexpr,
):
    """Gradients of the scan (formulas in the module docstring). Grid (channel blocks, batch).

    Writes dx, ddelta, dz (batch, T, d) contiguous in their inputs' dtypes; DB_PART, DC_PART
    (batch, n_dblocks, T, N), DA_PART (batch, d, N), DD_PART (batch, d) float32 partial sums;
    dh0 (batch, d, N) float32. SCR: (batch, n_dblocks, CHUNK, BLOCK_D, BLOCK_N) float32 scratch.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_off = offs_d[:, None] * N + offs_n[None, :]

    a = tl.load(A + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    a2 = a * 1.4426950408889634
    if HAS_D:
        dskip = tl.load(DSKIP + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_base = X + b * stride_xb + offs_d
    dt_base = DT + b * stride_dtb + offs_d
    b_base = BM + b * stride_bb + offs_n
    c_base = CM + b * stride_cb + offs_n
    z_base = Z + b * stride_zb + offs_d
    dy_base = DY + b * stride_dyb + offs_d
    grad_base = b * T * d + offs_d  # dx, ddelta, dz: contiguous (batch, T, d)
    part_base = (b * n_dblocks + pid_d) * T * N + offs_n  # dB, dC partials
    hs_base = HS + b * (n_chunks + 1) * d * N + state_off
    scr_base = SCR + (b * n_dblocks + pid_d) * (CHUNK * BLOCK_D * BLOCK_N) \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]

    if HAS_DHT:
        grad_h = tl.load(DHT + b * d * N + state_off, mask=mask_dn, other=0.0)
    else:
        grad_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    da_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dd_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        t0 = k * CHUNK
        t1 = tl.minimum(t0 + CHUNK, T)
        # Recompute the chunk's states; keep the state before each step.
        h = tl.load(hs_base + k * d * N, mask=mask_dn, other=0.0)
        for t in range(t0, t1):
            t64 = tl.cast(t, tl.int64)
            tl.store(scr_base + (t - t0) * (BLOCK_D * BLOCK_N), h)
            x = tl.load(x_base + t64 * stride_xt, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_base + t64 * stride_dtt, mask=mask_d, other=0.0).to(tl.float32)
            bv = tl.load(b_base + t64 * stride_bt, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.math.exp2(dt[:, None] * a2) * h + (dt * x)[:, None] * bv[None, :]
        tl.debug_barrier()
        # The reverse recurrence over the chunk; grad_h enters each step as a_{t+1} G_{t+1}.
        for i in range(0, t1 - t0):
            t = t1 - 1 - i
            t64 = tl.cast(t, tl.int64)
            h_prev = tl.load(scr_base + (t - t0) * (BLOCK_D * BLOCK_N))
            x = tl.load(x_base + t64 * stride_xt, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_base + t64 * stride_dtt, mask=mask_d, other=0.0).to(tl.float32)
            bv = tl.load(b_base + t64 * stride_bt, mask=mask_n, other=0.0).to(tl.float32)
            cv = tl.load(c_base + t64 * stride_ct, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dy_base + t64 * stride_dyt, mask=mask_d, other=0.0).to(tl.float32)
            decay = tl.math.exp2(dt[:, None] * a2)
            h = decay * h_prev + (dt * x)[:, None] * bv[None, :]
            if HAS_Z:
                zv = tl.load(z_base + t64 * stride_zt, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zv)
                g = dy * zv * sig
                ys = tl.sum(h * cv[None, :], 1)
                if HAS_D:
                    ys += dskip * x
                dz = dy * ys * sig * (1.0 + zv * (1.0 - sig))
                _store_cast(DZ + grad_base + t64 * d, dz, mask_d, INTERPRET)
            else:
                g = dy
            dc = tl.sum(g[:, None] * h, 0)
            grad_h += g[:, None] * cv[None, :]  # now G_t
            gb = tl.sum(grad_h * bv[None, :], 1)
            db = tl.sum(grad_h * (dt * x)[:, None], 0)
            gah = grad_h * decay * h_prev
            ddt = gb * x + tl.sum(gah * a, 1)
            dx = gb * dt
            if HAS_D:
                dx += g * dskip
                dd_acc += g * x
            da_acc += gah * dt[:, None]
            grad_h = grad_h * decay
            _store_cast(DX + grad_base + t64 * d, dx, mask_d, INTERPRET)
            _store_cast(DDT + grad_base + t64 * d, ddt, mask_d, INTERPRET)
            tl.store(DB_PART + part_base + t64 * N, db, mask=mask_n)
            tl.store(DC_PART + part_base + t64 * N, dc, mask=mask_n)
        tl.debug_barrier()  # the next chunk overwrites the scratch slab

    tl.store(DH0 + b * d * N + state_off, grad_h, mask=mask_dn)
    tl.store(DA_PART + b * d * N + state_off, da_acc, mask=mask_dn)
    if HAS_D:
        tl.store(DD_PART + b * d + offs_d, dd_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# host wrappers


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _config(x: torch.Tensor, n: int) -> tuple[Config, int]:
    n_pad = triton.next_power_of_2(n)
    return scan_config(x.shape[0], x.shape[2], n_pad, interpreting()), n_pad


def scan_fwd(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    h0: torch.Tensor | None,
    save_chunks: bool,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (batch, T, d) in x's dtype and the states (batch, n_chunks + 1, d, N) float32 when
    ``save_chunks`` (else (batch, 1, d, N) holding h_T). A, D, h0 contiguous; h0 float32."""
    batch, t, d = x.shape
    n = A.shape[1]
    cfg, n_pad = _config(x, n)
    chunk = chunk or cfg.chunk
    n_chunks = triton.cdiv(t, chunk)
    n_saved = n_chunks + 1 if save_chunks else 1
    y = new_buffer((batch, t, d), x)
    states = new_buffer((batch, n_saved, d, n), x, torch.float32)
    grid = (triton.cdiv(d, cfg.block_d), batch)
    scan_fwd_kernel[grid](
        x, delta, A, B, C, D if D is not None else A, z if z is not None else x,
        h0 if h0 is not None else states, y, states,
        *_strides(x), *_strides(delta), *_strides(B), *_strides(C), *_strides(z), *_strides(y),
        t, d, n, n_chunks, n_saved,
        CHUNK=chunk, BLOCK_D=cfg.block_d, BLOCK_N=n_pad,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE_CHUNKS=save_chunks,
        num_warps=cfg.num_warps,
    )
    return y, states


def scan_bwd(
    dy: torch.Tensor,
    dh_t: torch.Tensor | None,
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    states: torch.Tensor,
    chunk: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dx, ddelta, dA, dB, dC, dD or None, dz or None, dh0) for the states ``scan_fwd`` saved.

    dx, ddelta, dz come in their inputs' dtypes; dA, dB, dC, dD and dh0 in float32 (the caller
    casts). dh_t: (batch, d, N) float32 contiguous or None."""
    batch, t, d = x.shape
    n = A.shape[1]
    cfg, n_pad = _config(x, n)
    chunk = chunk or cfg.chunk
    n_chunks = triton.cdiv(t, chunk)
    assert states.shape[1] == n_chunks + 1, "states were not saved with the same chunk size"
    n_dblocks = triton.cdiv(d, cfg.block_d)
    dx = new_buffer((batch, t, d), x)
    ddelta = new_buffer((batch, t, d), delta)
    dz = new_buffer((batch, t, d), z) if z is not None else None
    db_part = new_buffer((batch, n_dblocks, t, n), x, torch.float32)
    dc_part = new_buffer((batch, n_dblocks, t, n), x, torch.float32)
    da_part = new_buffer((batch, d, n), x, torch.float32)
    dd_part = new_buffer((batch, d), x, torch.float32) if D is not None else None
    dh0 = new_buffer((batch, d, n), x, torch.float32)
    scratch = torch.empty((batch, n_dblocks, chunk, cfg.block_d, n_pad), device=x.device, dtype=torch.float32)
    grid = (n_dblocks, batch)
    scan_bwd_kernel[grid](
        x, delta, A, B, C, D if D is not None else A, z if z is not None else x, dy,
        dh_t if dh_t is not None else states, states, scratch,
        dx, ddelta, dz if dz is not None else dx, db_part, dc_part, da_part,
        dd_part if dd_part is not None else da_part, dh0,
        *_strides(x), *_strides(delta), *_strides(B), *_strides(C), *_strides(z), *_strides(dy),
        t, d, n, n_chunks, n_dblocks,
        CHUNK=chunk, BLOCK_D=cfg.block_d, BLOCK_N=n_pad,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DHT=dh_t is not None,
        num_warps=cfg.num_warps,
    )
    dd = dd_part.sum(0) if dd_part is not None else None
    return dx, ddelta, da_part.sum(0), db_part.sum(1), dc_part.sum(1), dd, dz, dh0
