"""Decoding attention in PyTorch without repeating the KV heads: what ``decode`` runs where the
Triton kernel does not (CPU tensors, float32 inputs).

``decode_reference`` (the specification) repeats every KV head ``H / Hkv`` times before its
matmuls: a full copy of the cache, several times over, at every decoding step. Here the query
heads of one KV head are stacked as extra query rows instead, so each KV head's keys and values
are read in place: (B, Hkv, rep * Tq, D) queries against (B, Hkv, S, D) keys. Same masking and
float32 softmax as the reference; tests compare the two.
"""

from __future__ import annotations

import math

import torch

from memlab.ops.attention.reference import _compute_dtype


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
    # (B, Tq, Hkv, rep, D) -> (B, Hkv, rep, Tq, D) -> (B, Hkv, rep * Tq, D): row r * Tq + j
    qg = q.to(cdt).view(b, tq, hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, rep * tq, d)
    kg = k_cache.to(cdt).transpose(1, 2)  # (B, Hkv, Smax, D), a view when no cast is needed
    vg = v_cache.to(cdt).transpose(1, 2)
    length = lengths.to(device=q.device, dtype=torch.int64)[:, :, None, None]  # (B, Hkv, 1, 1)
    j = torch.arange(tq, device=q.device).repeat(rep)  # the query index of each stacked row
    qpos = length - tq + j[None, None, :, None]  # (B, Hkv, rep * Tq, 1)
    kpos = torch.arange(smax, device=q.device)[None, None, None, :]
    allowed = (kpos < length) & (kpos <= qpos)
    if window is not None:
        allowed = allowed & ((kpos > qpos - int(window)) | (kpos < sinks))
    # The reference's masked softmax without its log-sum-exp, which decoding never uses.
    scores = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scale)  # (B, Hkv, rep * Tq, Smax)
    allowed = allowed.expand_as(scores)
    scores.masked_fill_(~allowed, float("-inf"))
    scores.masked_fill_(~allowed.any(dim=-1, keepdim=True), 0.0)  # rows that see nothing: finite
    p = torch.softmax(scores, dim=-1) * allowed  # not in place: softmax's backward reads its output
    o = torch.matmul(p.to(vg.dtype), vg)  # (B, Hkv, rep * Tq, D)
    return o.view(b, hkv, rep, tq, d).permute(0, 3, 1, 2, 4).reshape(b, tq, h, d).to(q.dtype)
