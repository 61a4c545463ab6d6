"""Decoding attention in PyTorch without the reference's copies of the KV heads: what ``decode``
runs where the Triton kernel does not (CPU tensors, float32 inputs).

``decode_reference`` (the specification) repeats every KV head ``H / Hkv`` times before its
matmuls: a full copy of the cache, several times over, at every decoding step. Here PyTorch's
fused ``scaled_dot_product_attention`` takes the cache as it is, with grouped heads
(``enable_gqa``) and the reference's visibility as a boolean mask, in float32 like the reference;
tests compare the two, outputs and gradients. (SmolLM2's shape, one layer at 4k on one CPU
thread: 13 ms for the reference, 1.3 ms for grouped matmuls, 0.8 ms for this.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memlab.ops.attention.reference import _compute_dtype, decode_visibility


def decode_grouped(
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
    """Same contract as ``decode_reference``: q (B, Tq, H, D); k_cache, v_cache (B, Smax, Hkv, D);
    lengths (B, Hkv) valid rows per (batch, KV head); query j sits at position L - Tq + j.
    Returns (B, Tq, H, D) in q's dtype. Query head h reads KV head h // (H / Hkv)."""
    b, tq, h, d = q.shape
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    rep = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cdt = _compute_dtype(q.dtype, upcast)
    qh = q.to(cdt).transpose(1, 2)  # (B, H, Tq, D)
    kh = k_cache.to(cdt).transpose(1, 2)  # (B, Hkv, Smax, D), a view when no cast is needed
    vh = v_cache.to(cdt).transpose(1, 2)
    lengths = lengths.to(device=q.device, dtype=torch.int64)
    # (B, H, Tq, Smax): a boolean mask, small beside the cache
    allowed = decode_visibility(lengths, tq, smax, window, sinks).repeat_interleave(rep, dim=1)
    # A row that sees nothing would give NaN (and NaN gradients) in SDPA: let it see every row,
    # then zero its output, as the reference does.
    visible = allowed.any(dim=-1, keepdim=True)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed | ~visible, scale=scale,
                                       enable_gqa=rep > 1)
    return o.masked_fill(~visible, 0.0).transpose(1, 2).to(q.dtype)
