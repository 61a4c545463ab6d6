"""Plain PyTorch attention: the specification that the Triton kernels are tested against.

Everything here materialises the (T, S) score matrix, so it is for tests, CPU runs and small
problems. Conventions shared with the kernels:

- Layout (B, T, H, D) for queries and (B, S, Hkv, D) for keys and values; H is a multiple of
  Hkv and query head h reads key/value head h // (H // Hkv) (GQA; Hkv = 1 is MQA).
- Query t sits at key position t + (S - T): when S > T the queries are the last T positions of
  the keys (chunked prefill), when S < T the first T - S queries see no key in causal mode.
- ``window`` w: a query at position p sees keys in (p - w, p]; ``sinks`` n: keys 0..n-1 are
  visible to every query whatever the window (StreamingLLM). Windows need ``causal=True``.
- ``head_windows``: one window per query head, -1 meaning the full causal range (DuoAttention).
- A query that sees no key returns zeros (not NaN), with log-sum-exp -inf.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "decode_reference", "visible_mask"]


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def visible_mask(
    t: int,
    s: int,
    *,
    causal: bool,
    windows: torch.Tensor | None,
    sinks: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Which keys each query sees, per head.

    windows: (H,) int64 with -1 for "no window", or None. Returns (H or 1, T, S) bool.
    """
    qpos = torch.arange(t, device=device)[:, None] + (s - t)  # (T, 1)
    kpos = torch.arange(s, device=device)[None, :]  # (1, S)
    allowed = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        allowed = kpos <= qpos
    if windows is None:
        return allowed[None]
    w = windows.to(device=device, dtype=torch.int64)[:, None, None]  # (H, 1, 1)
    in_window = (kpos[None] > qpos[None] - w) | (w < 0) | (kpos[None] < sinks)
    return allowed[None] & in_window


def _masked_softmax_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (..., T, D), k, v: (..., S, D), allowed broadcastable to (..., T, S).

    Returns o (..., T, D) and the natural log-sum-exp (..., T), -inf for rows that see nothing.
    Rows with no visible key get a finite dummy score row so that softmax and its gradient stay
    finite; the mask then zeroes them.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = allowed.expand_as(scores)
    any_visible = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = torch.where(any_visible, scores, torch.zeros_like(scores))
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(any_visible[..., 0], lse, torch.full_like(lse, float("-inf")))
    p = torch.softmax(scores, dim=-1) * allowed
    return torch.matmul(p.to(v.dtype), v), lse


def _window_vector(
    h: int, window: int | None, head_windows: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    if head_windows is not None:
        return torch.as_tensor(head_windows, device=device).to(torch.int64).reshape(h)
    if window is not None:
        return torch.full((h,), int(window), dtype=torch.int64, device=device)
    return None


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    sinks: int = 0,
    head_windows: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention, the specification of ``memlab.ops.attention.attention``.

    q: (B, T, H, D); k, v: (B, S, Hkv, D). Returns o: (B, T, H, D) in q's dtype, and with
    ``return_lse`` also the natural log-sum-exp of the scaled scores, (B, H, T) float32/64.

    ``cu_seqlens`` (N + 1,) int: a packed batch of N sequences, B = 1 and S = T; sequence i holds
    rows cu_seqlens[i]:cu_seqlens[i+1] and attends only within itself.
    ``upcast``: compute in float32 (float64 stays float64); False computes in q's dtype, which is
    the "plain PyTorch in the same dtype" baseline the kernel tolerances are measured against.
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if cu_seqlens is not None:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        outs, lses = [], []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            o_i, lse_i = attention_reference(
                q[:, start:end], k[:, start:end], v[:, start:end], causal=causal, scale=scale,
                window=window, sinks=sinks, head_windows=head_windows, upcast=upcast, return_lse=True,
            )
            outs.append(o_i)
            lses.append(lse_i)
        o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)
        return (o, lse) if return_lse else o
    cdt = _compute_dtype(q.dtype, upcast)
    rep = h // hkv
    qh = q.to(cdt).transpose(1, 2)  # (B, H, T, D)
    kh = k.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)  # (B, H, S, D)
    vh = v.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)
    windows = _window_vector(h, window, head_windows, q.device)
    allowed = visible_mask(t, s, causal=causal, windows=windows, sinks=sinks, device=q.device)
    o, lse = _masked_softmax_attend(qh, kh, vh, allowed[None], scale)
    o = o.transpose(1, 2).to(q.dtype)
    return (o, lse) if return_lse else o


def decode_visibility(
    lengths: torch.Tensor, tq: int, smax: int, window: int | None, sinks: int
) -> torch.Tensor:
    """(B, X, Tq, Smax) bool: which cache rows each of the Tq newest queries sees, for lengths
    (B, X) int64 valid rows per (batch, head); query j sits at position L - Tq + j."""
    length = lengths[:, :, None, None]
    qpos = length - tq + torch.arange(tq, device=lengths.device)[None, None, :, None]  # (B, X, Tq, 1)
    kpos = torch.arange(smax, device=lengths.device)[None, None, None, :]  # (1, 1, 1, Smax)
    allowed = (kpos < length) & (kpos <= qpos)
    if window is not None:
        allowed = allowed & ((kpos > qpos - int(window)) | (kpos < sinks))
    return allowed


def decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    sinks: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """Attention of a few new queries over ragged per-(batch, KV head) caches.

    q: (B, Tq, H, D); k_cache, v_cache: (B, Smax, Hkv, D); lengths: (B, Hkv) integer, the number
    of valid keys of each (batch, KV head), stored at cache rows 0..L-1. The Tq queries are the
    newest Tq of those L keys (already appended): query j sits at position L - Tq + j and sees
    cache rows <= its position, within ``window`` and ``sinks`` as in ``attention_reference``.
    Returns (B, Tq, H, D) in q's dtype.
    """
    b, tq, h, d = q.shape
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    rep = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cdt = _compute_dtype(q.dtype, upcast)
    lengths = lengths.to(device=q.device, dtype=torch.int64)
    qh = q.to(cdt).transpose(1, 2)  # (B, H, Tq, D)
    kh = k_cache.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)  # (B, H, Smax, D)
    vh = v_cache.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)
    allowed = decode_visibility(lengths.repeat_interleave(rep, dim=1), tq, smax, window, sinks)
    o, _ = _masked_softmax_attend(qh, kh, vh, allowed, scale)
    return o.transpose(1, 2).to(q.dtype)
