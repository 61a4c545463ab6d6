"""Causal Taylor (Based) linear attention in its quadratic form: fused Triton kernels with autograd.

Public functions:
- ``taylor_attention(q, k, v, *, eps)``: o_i = sum_{j<=i} p(s_ij) v_j / (sum_{j<=i} p(s_ij) + eps)
  with s_ij = q_i . k_j / sqrt(F) and p(s) = 1 + s + s^2 / 2; differentiable in q, k and v.
  Equal (up to rounding) to ``memlab.mixers.linear_core.chunked_linear_attention`` on the
  features ``memlab.mixers.based.taylor_feature_map(q)``, ``taylor_feature_map(k)`` with a zero
  initial state, without forming the 1 + F + F^2 features.
- ``taylor_attention_reference``: the dense masked PyTorch specification.

Dispatch: float32, bfloat16 and float16 tensors on CUDA run the Triton kernels (forward and
backward recompute the (T, T) scores tile by tile, FlashAttention-2 style, so memory is O(T));
under ``TRITON_INTERPRET=1`` CPU tensors run them too (tests). Everything else (CPU tensors,
float64 inputs) runs the reference, in float32 (float64 for float64 inputs). The Triton module
is imported on first use, so a missing or broken Triton never breaks ``import memlab``.

Limits: F (q and k's last dim) <= ``MAX_FEATURE_DIM`` = 64 and D (v's last dim) <=
``MAX_HEAD_DIM`` = 256, any sizes (not only powers of two); the kernels pad their tiles.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from memlab.ops.lazy_kernels import LazyKernels, describe, interpreting
from memlab.ops.taylor.reference import taylor_attention_reference

__all__ = [
    "taylor_attention",
    "taylor_attention_reference",
    "kernels_available",
    "uses_kernels",
    "MAX_FEATURE_DIM",
    "MAX_HEAD_DIM",
    "interpreting",
]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs the reference (tests, float64 models)
# The kernels keep (rows, F) and (rows, D) float32 tiles in registers, padded to powers of two.
MAX_FEATURE_DIM = 64
MAX_HEAD_DIM = 256

_KERNELS = LazyKernels("taylor-attention", ("memlab.ops.taylor.triton",))
_describe = describe


def _kernels() -> ModuleType:
    """memlab.ops.taylor.triton, imported on first use."""
    return _KERNELS.module("memlab.ops.taylor.triton")


def kernels_available() -> bool:
    """Whether the Triton kernels import (Triton installed and working)."""
    return _KERNELS.available()


def uses_kernels(x: Tensor) -> bool:
    """Whether ``taylor_attention`` on tensors like ``x`` runs the fused kernels (CUDA, or the CPU
    under the interpreter) rather than the dense (T, T) reference. Callers with a cheaper form of
    their own (the chunked linear attention on the CPU) use it to choose."""
    return x.dtype in KERNEL_DTYPES and _KERNELS.use(x)



# ----------------------------------------------------------------------------------------------
# input checks


def _check_tensor(name: str, x: object, letters: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape ({letters}), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape ({letters}), got {_describe(x)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {_describe(x)}")
    return x


def _check_inputs(q: object, k: object, v: object, eps: object) -> None:
    q = _check_tensor("q", q, "B, H, T, F")
    k = _check_tensor("k", k, "B, H, T, F")
    v = _check_tensor("v", v, "B, H, T, D")
    b, h, t, f = q.shape
    if b < 1 or h < 1 or t < 1 or f < 1:
        raise ValueError(f"q must be non-empty (B, H, T, F >= 1), got {_describe(q)}")
    if f > MAX_FEATURE_DIM:
        raise ValueError(
            f"q feature dim F={f} is not supported: expected F <= {MAX_FEATURE_DIM} "
            f"(use taylor_attention_reference for larger F); {_describe(q)}"
        )
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} (B, H, T, F), got {_describe(k)}")
    if tuple(v.shape[:3]) != (b, h, t):
        raise ValueError(f"v must have shape (B={b}, H={h}, T={t}, D) like q, got {_describe(v)}")
    d = v.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"v head dim D={d} is not supported: expected 1 <= D <= {MAX_HEAD_DIM} "
            f"(use taylor_attention_reference for larger D); {_describe(v)}"
        )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {_describe(x)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {_describe(x)}")
    is_number = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    if not is_number or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


# ----------------------------------------------------------------------------------------------
# autograd


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _TaylorAttention(torch.autograd.Function):
    """o from the forward kernel; the backward kernels recompute the scores from q and k."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
        o, den = _kernels().taylor_fwd(q, k, v, eps=eps)
        ctx.save_for_backward(q, k, v, o, den)
        ctx.eps = eps
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, den = ctx.saved_tensors
        # A gradient from sum() arrives expanded with stride 0 in every dim: give it a unit one.
        dq, dk, dv = _kernels().taylor_bwd(_unit_stride(do), q, k, v, o, den, eps=ctx.eps)
        return dq, dk, dv, None


# ----------------------------------------------------------------------------------------------
# public function


def taylor_attention(q: Tensor, k: Tensor, v: Tensor, *, eps: float) -> Tensor:
    """Causal Taylor (Based) linear attention, fused on GPU; differentiable in q, k and v.

    q, k: (B, H, T, F) raw projections (before any feature map), F <= 64; v: (B, H, T, D),
    D <= 256; all of one dtype (float32, bfloat16, float16; float64 runs the reference) and
    device. ``eps`` > 0 is added to the normaliser (which is >= 1/2 per visible key anyway).
    Returns o (B, H, T, D) in v's dtype:

        o_i = sum_{j<=i} p(s_ij) v_j / (sum_{j<=i} p(s_ij) + eps),
        s_ij = q_i . k_j / sqrt(F),  p(s) = 1 + s + s^2 / 2.

    The kernels accumulate in float32; 16-bit inputs enter the dot products as they are.
    """
    _check_inputs(q, k, v, eps)
    eps = float(eps)
    if not uses_kernels(q):
        return taylor_attention_reference(q, k, v, eps=eps)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if needs_grad:
        return _TaylorAttention.apply(q, k, v, eps)
    o, _ = _kernels().taylor_fwd(q, k, v, eps=eps)
    return o
