"""flash2: FlashAttention-2 attention and split-KV decoding, with their PyTorch references.

Public functions:
- ``attention(q, k, v, *, causal, scale, window, sinks, head_windows, cu_seqlens)``: prefill and
  training attention with autograd; q (B, T, H, D), k and v (B, S, Hkv, D).
- ``decode(q, k_cache, v_cache, lengths, *, scale, window, sinks)``: a few new queries over ragged
  per-(batch, KV head) caches.

Dispatch: float16/bfloat16 tensors on CUDA run the Triton kernels; under ``TRITON_INTERPRET=1``
CPU tensors run them too (tests). Everything else (CPU tensors, float32 inputs, the upcast path)
runs the PyTorch reference in float32 (decoding: ``decode_grouped``, the reference's arithmetic
without its per-step copies of the KV heads). The Triton modules are imported on first use, so a
missing or broken Triton never breaks ``import memlab``. The kernels are registered as
``torch.ops.memlab.flash2_*`` custom ops with fake implementations, so they trace under
``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from memlab.ops.attention.decode_grouped import decode_grouped
from memlab.ops.attention.reference import attention_reference, decode_reference
from memlab.ops.lazy_kernels import LazyKernels, describe, interpreting

__all__ = ["attention", "decode", "attention_reference", "decode_reference", "kernels_available"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
BACKWARD_HEAD_DIMS = (16, 32, 64, 128)
_WINDOW_CAP = 1 << 30  # the kernels' NO_WINDOW: longer than any sequence

_KERNELS = LazyKernels("flash2", ("memlab.ops.attention.triton", "memlab.ops.attention.decode_triton"))
_interpreting = interpreting
_describe = describe


def _kernels(name: str) -> ModuleType:
    """memlab.ops.attention.<name> (a Triton module), imported on first use."""
    return _KERNELS.module(f"memlab.ops.attention.{name}")


def kernels_available() -> bool:
    """Whether the Triton kernels import (Triton installed and working)."""
    return _KERNELS.available()


def _use_kernels(x: Tensor) -> bool:
    return x.dtype in KERNEL_DTYPES and _KERNELS.use(x)


# ----------------------------------------------------------------------------------------------
# input checks



def _check_tensor(name: str, x: object, ndim: int, letters: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape ({letters}), got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape ({letters}), got {_describe(x)}")
    return x


def _check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_scale(scale: object) -> None:
    if scale is None:
        return
    is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not is_number or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def _check_qkv(q: object, k: object, v: object, names: tuple[str, str, str], seq: str) -> None:
    qn, kn, vn = names
    q = _check_tensor(qn, q, 4, f"B, {'Tq' if seq == 'Smax' else 'T'}, H, D")
    k = _check_tensor(kn, k, 4, f"B, {seq}, Hkv, D")
    v = _check_tensor(vn, v, 4, f"B, {seq}, Hkv, D")
    for name, x in ((qn, q), (kn, k), (vn, v)):
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {_describe(x)}")
    for name, x in ((kn, k), (vn, v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have {qn}'s dtype {q.dtype}, got {_describe(x)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on {qn}'s device {q.device}, got {_describe(x)}")
    if v.shape != k.shape:
        raise ValueError(f"{vn} must have {kn}'s shape {tuple(k.shape)}, got {_describe(v)}")
    b, t, h, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"{kn} must have batch size B={b} like {qn}, got {_describe(k)}")
    if k.shape[3] != d:
        raise ValueError(f"{kn} must have head dim D={d} like {qn}, got {_describe(k)}")
    hkv = k.shape[2]
    if hkv < 1 or h % hkv:
        raise ValueError(f"{qn} heads H={h} must be a multiple of {kn} heads Hkv={hkv} ({_describe(k)})")
    if d not in HEAD_DIMS:
        raise ValueError(
            f"{qn} head dim D={d} is not supported: expected one of {HEAD_DIMS} "
            f"(use attention_reference / decode_reference for other sizes); {_describe(q)}"
        )
    if t < 1 or k.shape[1] < 1 or b < 1 or h < 1:
        raise ValueError(f"{qn} and {kn} must be non-empty, got {_describe(q)} and {_describe(k)}")


def _prepare_head_windows(head_windows: object, h: int, device: torch.device) -> Tensor:
    if isinstance(head_windows, Tensor):
        if head_windows.dtype.is_floating_point or head_windows.dtype == torch.bool:
            raise ValueError(f"head_windows must hold integers, got dtype {head_windows.dtype}")
        values = [int(x) for x in head_windows.reshape(-1).tolist()]
        shape = tuple(head_windows.shape)
    elif isinstance(head_windows, Sequence) and not isinstance(head_windows, str):
        values = list(head_windows)
        shape = (len(values),)
    else:
        raise ValueError(
            f"head_windows must be a tensor or a sequence of ints, got {type(head_windows).__name__}"
        )
    if shape != (h,):
        raise ValueError(f"head_windows must have shape (H={h},), got shape {shape}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
            raise ValueError(f"head_windows entries must be -1 (full) or ints >= 1, got {values}")
    # A window of 2**30 or more already covers any sequence: clamp, so that windows up to any int
    # (2**31 - 1, 2**40 as "no limit") fit the int32 table instead of failing its conversion.
    return torch.tensor([min(value, _WINDOW_CAP) for value in values], dtype=torch.int32, device=device)


def _prepare_cu_seqlens(cu_seqlens: object, q: Tensor, k: Tensor) -> tuple[Tensor, int]:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = _describe(cu_seqlens) if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor (N + 1,) with N >= 1, got {got}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must hold integers, got {_describe(cu_seqlens)}")
    if q.shape[0] != 1:
        raise ValueError(f"q must have B=1 when cu_seqlens packs the batch, got {_describe(q)}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k must have S=T={q.shape[1]} with cu_seqlens, got {_describe(k)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or bounds[-1] != q.shape[1] or min(lengths) < 0:
        raise ValueError(
            f"cu_seqlens must rise from 0 to T={q.shape[1]} without decreasing, got {bounds}"
        )
    return cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous(), max(lengths)


# ----------------------------------------------------------------------------------------------
# custom ops


def _max_seqlen(cu_seqlens: Tensor | None) -> int:
    return 0 if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


@torch.library.custom_op("memlab::flash2_attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    window: int | None,
    sinks: int,
    head_windows: Tensor | None,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(o (B, T, H, D), lse2 (B, H, T) float32, base 2, +inf where a query sees no key)."""
    return _kernels("triton").attention_fwd(
        q, k, v, causal=causal, scale=scale, window=window, sinks=sinks, head_windows=head_windows,
        cu_seqlens=cu_seqlens, max_seqlen=_max_seqlen(cu_seqlens),
    )


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, causal, scale, window, sinks, head_windows, cu_seqlens):
    b, t, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("memlab::flash2_attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    window: int | None,
    sinks: int,
    head_windows: Tensor | None,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq (B, T, H, D), dk (B, S, Hkv, D), dv (B, S, Hkv, D))."""
    return _kernels("triton").attention_bwd(
        do, q, k, v, o, lse, causal=causal, scale=scale, window=window, sinks=sinks,
        head_windows=head_windows, cu_seqlens=cu_seqlens, max_seqlen=_max_seqlen(cu_seqlens),
    )


@_attention_bwd_op.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, causal, scale, window, sinks, head_windows, cu_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale, window, sinks, head_windows, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, head_windows, cu_seqlens)
    ctx.options = (causal, scale, window, sinks)


def _attention_backward(ctx, do: Tensor, dlse: Tensor | None):
    q, k, v, o, lse, head_windows, cu_seqlens = ctx.saved_tensors
    causal, scale, window, sinks = ctx.options
    dq, dk, dv = torch.ops.memlab.flash2_attention_bwd(
        do, q, k, v, o, lse, causal, scale, window, sinks, head_windows, cu_seqlens
    )
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("memlab::flash2_decode", mutates_args=())
def _decode_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    scale: float,
    window: int | None,
    sinks: int,
) -> Tensor:
    """o (B, Tq, H, D) from q (B, Tq, H, D), caches (B, Smax, Hkv, D), lengths (B, Hkv) int32."""
    return _kernels("decode_triton").decode_fwd(
        q, k_cache, v_cache, lengths, scale=scale, window=window, sinks=sinks
    )


@_decode_op.register_fake
def _decode_fake(q, k_cache, v_cache, lengths, scale, window, sinks):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------------------------
# public functions


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    sinks: int = 0,
    head_windows: Tensor | Sequence[int] | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Softmax attention, FlashAttention-2 on GPU; differentiable in q, k and v.

    q: (B, T, H, D); k, v: (B, S, Hkv, D) with H a multiple of Hkv (GQA, MQA); D in
    {16, 32, 64, 128} with gradients, 256 forward only. Returns o: (B, T, H, D).

    - ``causal``: query t (at key position t + S - T) sees keys <= its position.
    - ``scale``: score multiplier, 1/sqrt(D) by default.
    - ``window`` w (causal only): keys in (p - w, p] for a query at position p.
    - ``sinks`` n: keys 0..n-1 stay visible whatever the window.
    - ``head_windows``: (H,) one window per query head, -1 for full attention; excludes ``window``.
    - ``cu_seqlens``: (N + 1,) cumulative lengths of N sequences packed along T (B = 1, S = T).
    Semantics are those of ``attention_reference``; a query that sees no key returns zeros.
    """
    _check_qkv(q, k, v, ("q", "k", "v"), "S")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    _check_scale(scale)
    _check_int("window", window, 1, allow_none=True)
    _check_int("sinks", sinks, 0)
    b, t, h, d = q.shape
    hw = None
    if head_windows is not None:
        if window is not None:
            raise ValueError(f"give window={window} or head_windows, not both")
        hw = _prepare_head_windows(head_windows, h, q.device)
    if (window is not None or hw is not None) and not causal:
        raise ValueError(
            f"window and head_windows need causal=True (a window ends at the query), got causal=False "
            f"with window={window}, head_windows={None if hw is None else hw.tolist()}"
        )
    cu, _ = (None, 0) if cu_seqlens is None else _prepare_cu_seqlens(cu_seqlens, q, k)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if needs_grad and d not in BACKWARD_HEAD_DIMS:
        raise ValueError(f"q head dim D={d} has no backward kernel: gradients need D in {BACKWARD_HEAD_DIMS}")
    if not _use_kernels(q):
        return attention_reference(
            q, k, v, causal=causal, scale=scale, window=window, sinks=sinks, head_windows=hw, cu_seqlens=cu
        )
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    o, _ = torch.ops.memlab.flash2_attention_fwd(q, k, v, causal, scale, window, sinks, hw, cu)
    return o


def decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    sinks: int = 0,
    check_lengths: bool = True,
) -> Tensor:
    """Attention of Tq new queries over ragged caches; split-KV (flash-decoding) on GPU.

    q: (B, Tq, H, D) with small Tq (1 to decode, a few for speculative decoding);
    k_cache, v_cache: (B, Smax, Hkv, D); lengths: (B, Hkv) integer, valid keys per (batch, KV
    head) in cache rows 0..L-1, the newest Tq of them belonging to the queries (query j sits at
    position L - Tq + j). ``window`` and ``sinks`` as in ``attention``. Returns (B, Tq, H, D).

    ``check_lengths=False`` skips the range check of ``lengths``, which reads them on the host
    (a device sync); decoding loops whose lengths are known to be valid can turn it off.
    """
    _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"), "Smax")
    _check_scale(scale)
    _check_int("window", window, 1, allow_none=True)
    _check_int("sinks", sinks, 0)
    b, tq, h, d = q.shape
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    if not isinstance(lengths, Tensor) or tuple(lengths.shape) != (b, hkv):
        got = _describe(lengths) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be an integer tensor of shape (B={b}, Hkv={hkv}), got {got}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must hold integers, got {_describe(lengths)}")
    if check_lengths:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > smax:
            raise ValueError(
                f"lengths must lie in [0, Smax={smax}] (the cache capacity), got min {lo}, max {hi}"
            )
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not _use_kernels(q):
        # The reference's arithmetic without its copies of every KV head (see decode_grouped).
        return decode_grouped(q, k_cache, v_cache, lengths, scale=scale, window=window, sinks=sinks)
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    q, k_cache, v_cache = _unit_stride(q), _unit_stride(k_cache), _unit_stride(v_cache)
    return torch.ops.memlab.flash2_decode(q, k_cache, v_cache, lengths, scale, window, sinks)
