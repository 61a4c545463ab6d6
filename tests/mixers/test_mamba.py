"""Mamba: the chunked scan against a plain token loop, the whole block against a hand-written
reference, the paper's initialisation, decays in (0, 1), and config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlab import mixers
from memlab.mixers.mamba import Mamba, selective_scan

DT = torch.float64


def sequential_scan(u, dt, a, bm, cm, d, h0):
    """h_t = exp(dt_t a) h_{t-1} + dt_t bm_t u_t; y_t = cm_t . h_t + d u_t, one token at a time."""
    h, ys = h0.clone(), []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * a) * h + (dt[:, t] * u[:, t])[:, :, None] * bm[:, t, None, :]
        ys.append((h * cm[:, t, None, :]).sum(-1) + d * u[:, t])
    return torch.stack(ys, dim=1), h


def random_scan_inputs(b=2, t=37, e=5, n=3, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, t, e, generator=g, dtype=DT)
    dt = F.softplus(torch.randn(b, t, e, generator=g, dtype=DT)) * dt_scale
    a = -torch.rand(e, n, generator=g, dtype=DT) * 4 - 0.1
    bm = torch.randn(b, t, n, generator=g, dtype=DT)
    cm = torch.randn(b, t, n, generator=g, dtype=DT)
    d = torch.randn(e, generator=g, dtype=DT)
    h0 = torch.randn(b, e, n, generator=g, dtype=DT)
    return u, dt, a, bm, cm, d, h0


@pytest.mark.parametrize("chunk", [1, 2, 3, 8, 16, 37, 64])
def test_chunked_scan_equals_sequential(chunk: int) -> None:
    args = random_scan_inputs()
    y_ref, h_ref = sequential_scan(*args)
    y, h = selective_scan(*args, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=0)


def test_scan_stable_for_huge_steps() -> None:
    # dt up to ~500: cumulative log-decays reach -1e5 inside a chunk; exp(-cum) would overflow.
    args = random_scan_inputs(t=50, dt_scale=200.0, seed=3)
    y_ref, h_ref = sequential_scan(*args)
    y, h = selective_scan(*args, chunk_size=32)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-10, rtol=0)


def test_checkpointed_gradients_match() -> None:
    args = [a.clone().requires_grad_(True) for a in random_scan_inputs(t=21)]
    y1, h1 = selective_scan(*args, chunk_size=4, checkpoint=True)
    g1 = torch.autograd.grad((y1**2).sum() + h1.sum(), args)
    y2, h2 = selective_scan(*args, chunk_size=4, checkpoint=False)
    g2 = torch.autograd.grad((y2**2).sum() + h2.sum(), args)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def reference_block(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The Mamba block written out token by token, independent of the module's forward."""
    b, t, _ = x.shape
    e, k = m.d_inner, m.config.d_conv
    xz = x @ m.in_proj.weight.T
    xs, z = xz[..., :e], xz[..., e:]
    w = m.conv.weight[:, 0]  # (E, K)
    conv = torch.zeros(b, t, e, dtype=DT)
    for i in range(t):
        for j in range(k):
            src = i - (k - 1) + j
            if src >= 0:
                conv[:, i] += w[:, j] * xs[:, src]
    xc = F.silu(conv + m.conv.bias)
    proj = xc @ m.x_proj.weight.T
    dt = F.softplus(proj[..., : m.dt_rank] @ m.dt_proj.weight.T + m.dt_proj.bias)
    bm = proj[..., m.dt_rank : m.dt_rank + m.d_state]
    cm = proj[..., m.dt_rank + m.d_state :]
    a = -torch.exp(m.A_log)
    y, _ = sequential_scan(xc, dt, a, bm, cm, m.D, torch.zeros(b, e, m.d_state, dtype=DT))
    return (y * F.silu(z)) @ m.out_proj.weight.T


@pytest.mark.parametrize("chunk", [3, 64])
def test_block_matches_reference(chunk: int) -> None:
    torch.manual_seed(0)
    m = mixers.build("mamba", d_model=16, d_state=4, chunk_size=chunk).double()
    x = torch.randn(2, 13, 16, dtype=DT)
    with torch.no_grad():
        y, state = m(x)
        torch.testing.assert_close(y, reference_block(m, x), atol=1e-10, rtol=0)
    assert state["conv"].shape == (2, 32, 3) and state["ssm"].shape == (2, 32, 4)
    # The conv tail holds the last d_conv - 1 pre-conv inputs.
    xs = (x @ m.in_proj.weight.T)[..., :32]
    torch.testing.assert_close(state["conv"], xs[:, -3:].transpose(1, 2), atol=1e-12, rtol=0)


def test_paper_initialisation() -> None:
    torch.manual_seed(0)
    m = mixers.build("mamba", d_model=64)
    assert m.dt_rank == math.ceil(64 / 16) and m.d_inner == 128 and m.d_state == 16
    torch.testing.assert_close(-torch.exp(m.A_log.detach()), -torch.arange(1, 17.0).repeat(128, 1))
    assert torch.equal(m.D.detach(), torch.ones(128, dtype=m.D.dtype))
    dt0 = F.softplus(m.dt_proj.bias.detach())
    assert dt0.min() >= 1e-3 * (1 - 1e-5) and dt0.max() <= 0.1 * (1 + 1e-5)
    # log-uniform over two decades: both decades are populated
    assert (dt0 < 1e-2).sum() > 20 and (dt0 > 1e-2).sum() > 20
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound


def test_decays_in_open_unit_interval() -> None:
    torch.manual_seed(0)
    m = mixers.build("mamba", d_model=16).double()
    with torch.no_grad():
        x = torch.randn(3, 50, 16, dtype=DT) * 5
        dec = m.decays(x)
    assert dec.shape == (3, 50, 32, 16)
    assert (dec > 0).all() and (dec < 1).all()
    # Selectivity: the decay depends on the token.
    assert (dec[:, 1:] - dec[:, :-1]).abs().max() > 1e-3


def test_state_carries_information_far_back() -> None:
    # With small dt the state decays slowly: a token 100 steps back still moves the output.
    torch.manual_seed(0)
    m = mixers.build("mamba", d_model=16).double().eval()
    x = torch.randn(1, 120, 16, dtype=DT)
    with torch.no_grad():
        y0, _ = m(x)
        x2 = x.clone()
        x2[:, 0] += 3.0
        y1, _ = m(x2)
    assert (y1[:, 100:] - y0[:, 100:]).abs().max() > 1e-8


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"d_state": 0}, "d_state"),
        ({"d_conv": 0}, "d_conv"),
        ({"expand": 0}, "expand"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"dt_rank": 0}, "dt_rank"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
        ({"dt_min": -1.0}, "dt_min"),
    ],
)
def test_config_errors(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        mixers.build("mamba", d_model=16, **options)


def test_scan_rejects_bad_chunk() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(*random_scan_inputs(t=4), chunk_size=0)
