"""Selective scan (Mamba-1, S6): a fused Triton kernel with autograd, and its PyTorch reference.

Public functions:
- ``selective_scan(x, delta, A, B, C, D, z, *, h0, return_state)``: the S6 recurrence over a
  sequence (formulas in ``reference.py``), differentiable in every tensor input.
- ``selective_scan_reference``: the step-by-step PyTorch specification.

Dispatch: CUDA tensors run the Triton kernels (forward and backward keep the state in
registers and store it only every CHUNK steps); under ``TRITON_INTERPRET=1`` CPU tensors run
them too (tests). Other CPU tensors run the reference in float32. The Triton module is imported
on first use, so a missing or broken Triton never breaks ``import memlab``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from memlab.ops.lazy_kernels import LazyKernels, describe, interpreting
from memlab.ops.scan.reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference", "kernels_available", "MAX_STATE", "interpreting"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STATE = 256  # largest N: the kernels hold (channels, N) state tiles in registers

_KERNELS = LazyKernels("selective-scan", ("memlab.ops.scan.triton",))
_describe = describe


def _kernels() -> ModuleType:
    """memlab.ops.scan.triton, imported on first use."""
    return _KERNELS.module("memlab.ops.scan.triton")


def kernels_available() -> bool:
    """Whether the Triton kernels import (Triton installed and working)."""
    return _KERNELS.available()


def _use_kernels(x: Tensor) -> bool:
    return _KERNELS.use(x)


# ----------------------------------------------------------------------------------------------
# input checks



def _check(name: str, t: object, shape: tuple[int, ...], letters: str, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape ({letters}), got {type(t).__name__}")
    if tuple(t.shape) != shape:
        want = ", ".join(f"{letter}={size}" for letter, size in zip(letters.split(", "), shape, strict=True))
        raise ValueError(f"{name} must have shape ({want}), got {_describe(t)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {_describe(t)}")
    return t


def _check_inputs(x, delta, A, B, C, D, z, h0) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = _describe(x) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a torch.Tensor of shape (batch, T, d), got {got}")
    batch, t, d = x.shape
    if batch < 1 or t < 1 or d < 1:
        raise ValueError(f"x must be non-empty (batch >= 1, T >= 1, d >= 1), got {_describe(x)}")
    dev = x.device
    _check("x", x, (batch, t, d), "batch, T, d", dev)
    _check("delta", delta, (batch, t, d), "batch, T, d", dev)
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != d:
        got = _describe(A) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"A must be a torch.Tensor of shape (d={d}, N), got {got}")
    n = A.shape[1]
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"A's state size N={n} must lie in [1, {MAX_STATE}], got {_describe(A)}")
    _check("A", A, (d, n), "d, N", dev)
    _check("B", B, (batch, t, n), "batch, T, N", dev)
    _check("C", C, (batch, t, n), "batch, T, N", dev)
    if D is not None:
        _check("D", D, (d,), "d", dev)
    if z is not None:
        _check("z", z, (batch, t, d), "batch, T, d", dev)
    if h0 is not None:
        _check("h0", h0, (batch, d, n), "batch, d, N", dev)


# ----------------------------------------------------------------------------------------------
# autograd


def _unit_stride(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class _SelectiveScan(torch.autograd.Function):
    """(y, h_T) from the Triton kernels; the backward recomputes states chunk by chunk."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, h0):
        kernels = _kernels()
        y, states = kernels.scan_fwd(x, delta, A, B, C, D, z, h0, save_chunks=True)
        ctx.save_for_backward(x, delta, A, B, C, D, z, states)
        ctx.has_h0 = h0 is not None
        ctx.set_materialize_grads(False)
        # A copy, not a view of the saved states: in-place edits of h_T must not reach them.
        return y, states[:, -1].clone()

    @staticmethod
    def backward(ctx, dy, dh_t):
        x, delta, A, B, C, D, z, states = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dy = _unit_stride(dy)
        if dh_t is not None:
            dh_t = dh_t.to(torch.float32).contiguous()
        dx, ddelta, da, db, dc, dd, dz, dh0 = _kernels().scan_bwd(dy, dh_t, x, delta, A, B, C, D, z, states)
        return (
            dx,
            ddelta,
            da.to(A.dtype),
            db.to(B.dtype),
            dc.to(C.dtype),
            None if D is None else dd.to(D.dtype),
            dz,
            dh0 if ctx.has_h0 else None,
        )


# ----------------------------------------------------------------------------------------------
# public function


def selective_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    h0: Tensor | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan of Mamba-1, fused on GPU; differentiable in every tensor input.

    x, delta: (batch, T, d), ``delta`` used as given (apply softplus and the bias before);
    A: (d, N), real (negative for a decaying state); B, C: (batch, T, N), shared by all channels;
    D: (d,) optional skip; z: (batch, T, d) optional gate, y = y * silu(z); h0: (batch, d, N)
    optional initial state. Returns y (batch, T, d) in x's dtype, and with ``return_state`` also
    the final state h_T (batch, d, N) float32, which as ``h0`` of a next call continues the
    sequence exactly.

    Each tensor may be float32, bfloat16 or float16 (dtypes may differ); state and sums are
    float32 and every gradient comes back in its input's dtype. N <= ``MAX_STATE``.
    """
    _check_inputs(x, delta, A, B, C, D, z, h0)
    if not isinstance(return_state, bool):
        raise ValueError(f"return_state must be a bool, got {return_state!r}")
    if not _use_kernels(x):
        y, h_t = selective_scan_reference(x, delta, A, B, C, D, z, h0=h0, return_state=True)
        return (y, h_t) if return_state else y
    x, delta, B, C, z = (_unit_stride(t) for t in (x, delta, B, C, z))
    A = A.contiguous()
    D = None if D is None else D.contiguous()
    h0_f32 = None if h0 is None else h0.to(torch.float32).contiguous()
    inputs = (x, delta, A, B, C, D, z, h0)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if needs_grad:
        # The float32 copy of h0 is a differentiable cast: dh0 flows back in h0's dtype.
        y, h_t = _SelectiveScan.apply(x, delta, A, B, C, D, z, h0_f32)
    else:
        y, states = _kernels().scan_fwd(x, delta, A, B, C, D, z, h0_f32, save_chunks=False)
        h_t = states[:, 0]
    return (y, h_t) if return_state else y
