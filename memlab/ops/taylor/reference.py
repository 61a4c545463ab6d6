"""Plain PyTorch causal Taylor (Based) linear attention: the specification the kernels are tested against.

Per batch and head, for q, k (T, F) and v (T, D):

    s_ij  = q_i . k_j / sqrt(F),   p_ij = 1 + s_ij + s_ij^2 / 2   (the 2nd-order Taylor expansion of exp)
    o_i   = sum_{j<=i} p_ij v_j / (sum_{j<=i} p_ij + eps)

It materialises the masked (T, T) matrix of p, so it is for tests, CPU runs and short sequences.
This is linear attention with the feature map ``memlab.mixers.based.taylor_feature_map`` written
without the features: phi(q_i) . phi(k_j) = p_ij. Autograd flows through q, k and v.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["taylor_attention_reference"]


def _compute_dtype(dtypes: list[torch.dtype], upcast: bool, v_dtype: torch.dtype) -> torch.dtype:
    if torch.float64 in dtypes:
        return torch.float64
    return torch.float32 if upcast else v_dtype


def taylor_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, eps: float, upcast: bool = True) -> Tensor:
    """Causal Taylor linear attention through the dense masked score matrix.

    q, k: (B, H, T, F); v: (B, H, T, D). Returns o (B, H, T, D) in v's dtype.

    ``upcast``: compute in float32 (float64 when any input is float64); False computes in v's
    dtype, the way plain PyTorch in that dtype would (the tests' yardstick for the rounding
    error a 16-bit dtype brings by itself).
    """
    cdt = _compute_dtype([q.dtype, k.dtype, v.dtype], upcast, v.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    t, f = q.shape[-2], q.shape[-1]
    s = torch.matmul(qc, kc.transpose(-1, -2)) / math.sqrt(f)  # (B, H, T, T)
    p = 1 + s + 0.5 * s * s
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    p = p.masked_fill(~causal, 0.0)
    num = torch.matmul(p, vc)
    den = p.sum(dim=-1, keepdim=True)
    return (num / (den + eps)).to(v.dtype)
