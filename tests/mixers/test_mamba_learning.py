"""Mamba's training path: gradients of the chunked log-depth scan equal those of a plain token loop.

The forward equality is tested in test_mamba.py; the learning problems investigated on MQAR made the
backward pass a suspect too (F.pad with negative padding, checkpointed chunks, state carried across
chunks), so every input's gradient is checked against autograd through the token loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlab.mixers.mamba import selective_scan

DT = torch.float64


def sequential_scan(u, dt, a, bm, cm, d, h0):
    """h_t = exp(dt_t a) h_{t-1} + dt_t bm_t u_t; y_t = cm_t . h_t + d u_t, one token at a time."""
    h, ys = h0, []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * a) * h + (dt[:, t] * u[:, t])[:, :, None] * bm[:, t, None, :]
        ys.append((h * cm[:, t, None, :]).sum(-1) + d * u[:, t])
    return torch.stack(ys, dim=1), h


def random_scan_inputs(b=2, t=37, e=5, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, t, e, generator=g, dtype=DT)
    dt = F.softplus(torch.randn(b, t, e, generator=g, dtype=DT))
    a = -torch.rand(e, n, generator=g, dtype=DT) * 4 - 0.1
    bm = torch.randn(b, t, n, generator=g, dtype=DT)
    cm = torch.randn(b, t, n, generator=g, dtype=DT)
    d = torch.randn(e, generator=g, dtype=DT)
    h0 = torch.randn(b, e, n, generator=g, dtype=DT)
    return u, dt, a, bm, cm, d, h0


@pytest.mark.parametrize(
    ("chunk", "checkpoint"), [(1, False), (4, True), (7, False), (16, True), (64, False)]
)
def test_scan_gradients_match_token_loop(chunk: int, checkpoint: bool) -> None:
    args = [a.clone().requires_grad_(True) for a in random_scan_inputs(t=37, seed=5)]
    w = torch.randn(2, 37, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    y, h = selective_scan(*args, chunk_size=chunk, checkpoint=checkpoint)
    grads = torch.autograd.grad((y * w).sum() + (h**2).sum(), args)
    y_ref, h_ref = sequential_scan(*args)
    grads_ref = torch.autograd.grad((y_ref * w).sum() + (h_ref**2).sum(), args)
    names = ("u", "dt", "a", "bm", "cm", "d", "h0")
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g_ref.abs().max() > 1e-3, name  # every input matters, so the check has teeth
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0, msg=f"gradient of {name}")
