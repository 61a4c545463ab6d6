"""Causal kernelized linear attention: the chunked training form and the recurrent decoding form.

Shared by ``linear_attention`` and ``based``. Given feature-mapped queries and keys
phi(q), phi(k) (B, H, T, F) and values v (B, H, T, Dv), token t reads

    num_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s = phi(q_t) @ S_t,   S_t = sum_{s<=t} phi(k_s) v_s^T
    den_t = sum_{s<=t}  phi(q_t) . phi(k_s)      = phi(q_t) . z_t,    z_t = sum_{s<=t} phi(k_s)
    y_t   = num_t / (den_t + eps)          (or num_t alone when ``normalize`` is False)

The state is (S, z): S (B, H, F, Dv) and z (B, H, F), whatever the sequence length.
The chunked form splits T into chunks of C tokens: inside a chunk the masked (C, C) score
matrix is used directly; across chunks the state at each chunk start (an exclusive prefix sum
of per-chunk k^T v) carries everything earlier. This is exact, so any chunking of the sequence
(and the recurrent form) gives the same result up to rounding.
"""

from __future__ import annotations

import torch


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, z: torch.Tensor
) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be (B, H, T, F), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    b, h, t, f = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, h, t):
        raise ValueError(f"v must be (B={b}, H={h}, T={t}, Dv), got {tuple(v.shape)}")
    if kv.shape != (b, h, f, v.shape[-1]):
        raise ValueError(f"kv must be (B, H, F, Dv)={(b, h, f, v.shape[-1])}, got {tuple(kv.shape)}")
    if z.shape != (b, h, f):
        raise ValueError(f"z must be (B, H, F)={(b, h, f)}, got {tuple(z.shape)}")


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    z: torch.Tensor,
    *,
    eps: float,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-by-token form (decoding, and the sequential reference for the chunked form).

    q, k: (B, H, T, F) features; v: (B, H, T, Dv); kv: (B, H, F, Dv); z: (B, H, F).
    Returns y (B, H, T, Dv) and the state (kv, z) after the last token.
    """
    _check_shapes(q, k, v, kv, z)
    outs = []
    for t in range(q.shape[2]):
        qt, kt, vt = q[:, :, t], k[:, :, t], v[:, :, t]
        kv = kv + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        z = z + kt
        num = torch.einsum("bhf,bhfd->bhd", qt, kv)
        if normalize:
            num = num / ((qt * z).sum(-1, keepdim=True) + eps)
        outs.append(num)
    return torch.stack(outs, dim=2), kv, z


def chunked_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    z: torch.Tensor,
    *,
    chunk_size: int,
    eps: float,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk-parallel form used for training and prefill; loops over nothing in Python.

    q, k: (B, H, T, F) features; v: (B, H, T, Dv); kv: (B, H, F, Dv); z: (B, H, F).
    Returns y (B, H, T, Dv) and the state (kv, z) after the last token. Memory is
    O(T * (C + F * Dv / C)) per head: the per-chunk start states are materialised.
    """
    _check_shapes(q, k, v, kv, z)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, h, t, f = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        # Zero keys and values add nothing to any state; the padded query rows are dropped.
        q, k, v = (torch.nn.functional.pad(a, (0, 0, 0, pad)) for a in (q, k, v))
    qc = q.reshape(b, h, n, c, f)
    kc = k.reshape(b, h, n, c, f)
    vc = v.reshape(b, h, n, c, dv)

    # Per-chunk sums, then the state at the start of each chunk (exclusive prefix, seeded by kv, z).
    chunk_kv = torch.einsum("bhncf,bhncd->bhnfd", kc, vc)
    chunk_z = kc.sum(dim=3)
    start_kv = torch.cat([kv.unsqueeze(2), chunk_kv[:, :, :-1]], dim=2).cumsum(dim=2)
    start_z = torch.cat([z.unsqueeze(2), chunk_z[:, :, :-1]], dim=2).cumsum(dim=2)

    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bhncf,bhnsf->bhncs", qc, kc).masked_fill(~causal, 0.0)
    num = torch.einsum("bhncs,bhnsd->bhncd", scores, vc) + torch.einsum("bhncf,bhnfd->bhncd", qc, start_kv)
    if normalize:
        den = scores.sum(-1) + torch.einsum("bhncf,bhnf->bhnc", qc, start_z)
        num = num / (den.unsqueeze(-1) + eps)
    y = num.reshape(b, h, n * c, dv)[:, :, :t]
    return y, start_kv[:, :, -1] + chunk_kv[:, :, -1], start_z[:, :, -1] + chunk_z[:, :, -1]
