"""Plain PyTorch selective scan (Mamba-1, S6): the specification the Triton kernels are tested against.

A step-by-step loop over time, so it is for tests, CPU runs and short sequences. Per batch b,
channel c and state n:

    h_t[c, n] = exp(delta_t[c] * A[c, n]) * h_{t-1}[c, n] + delta_t[c] * B_t[n] * x_t[c]
    y_t[c]    = sum_n C_t[n] * h_t[c, n] + D[c] * x_t[c]
    y_t[c]    = y_t[c] * silu(z_t[c])                       (when a gate z is given)

with h_0 = h0 (zeros when not given). ``delta`` is used as given: the caller applies softplus and
the bias. B and C are shared by all channels (Mamba-1's input-dependent B and C).

Autograd flows through every input, h0 included, by PyTorch's own differentiation of the loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["selective_scan_reference"]


def _compute_dtype(dtypes: list[torch.dtype], upcast: bool, x_dtype: torch.dtype) -> torch.dtype:
    if torch.float64 in dtypes:
        return torch.float64
    return torch.float32 if upcast else x_dtype


def selective_scan_reference(
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
    upcast: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan, one time step after the other.

    x, delta: (batch, T, d); A: (d, N); B, C: (batch, T, N); D: (d,) or None; z: (batch, T, d) or
    None; h0: (batch, d, N) or None. Returns y (batch, T, d) in x's dtype, and with
    ``return_state`` also the final state h_T (batch, d, N) in the compute dtype.

    ``upcast``: compute (state, decays, sums) in float32, float64 when any input is float64;
    False computes in x's dtype, the way a plain PyTorch loop in that dtype would (the tests'
    yardstick for the rounding error a low-precision dtype brings by itself).
    """
    given = [t for t in (x, delta, A, B, C, D, z, h0) if t is not None]
    cdt = _compute_dtype([t.dtype for t in given], upcast, x.dtype)
    xs, dts, a, bs, cs = (t.to(cdt) for t in (x, delta, A, B, C))
    batch, length, d = x.shape
    n = A.shape[1]
    h = xs.new_zeros(batch, d, n) if h0 is None else h0.to(cdt)
    ys = []
    for t in range(length):
        dt = dts[:, t]  # (batch, d)
        decay = torch.exp(dt.unsqueeze(-1) * a)  # (batch, d, N)
        h = decay * h + (dt * xs[:, t]).unsqueeze(-1) * bs[:, t].unsqueeze(1)
        ys.append(torch.einsum("bcn,bn->bc", h, cs[:, t]))
    y = torch.stack(ys, dim=1)  # (batch, T, d)
    if D is not None:
        y = y + xs * D.to(cdt)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(cdt))
    y = y.to(x.dtype)
    return (y, h) if return_state else y
