"""hopfield: one-step retrieval, energy descent, equivalence to attention, the multi-step mixer
against a dense reference, and the window option."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlab import mixers
from memlab.mixers.hopfield import hopfield_energy, hopfield_update
from memlab.mixers.rope import rotary

ATOL = 1e-10  # float64


def explicit_update(xi: torch.Tensor, patterns: torch.Tensor, beta: float) -> torch.Tensor:
    """xi (D,), patterns X (N, D): X^T softmax(beta X xi), term by term."""
    p = torch.softmax(beta * (patterns @ xi), dim=0)
    return patterns.T @ p


def test_update_is_the_paper_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    xi = torch.randn(6, generator=g, dtype=torch.float64)
    expected = xi
    for _ in range(3):
        expected = explicit_update(expected, x, 0.7)
    got = hopfield_update(xi[None], x, 0.7, steps=3)[0]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(hopfield_update(xi[None], x, 0.7, steps=0)[0], xi)


def test_one_update_retrieves_a_stored_pattern() -> None:
    """(a) Well-separated random patterns, large beta: one update from a noisy copy lands on it."""
    g = torch.Generator().manual_seed(0)
    n, d = 32, 64
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noisy = x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)  # every pattern, with noise
    out = hopfield_update(noisy, x, beta=1.0, steps=1)
    cos = F.cosine_similarity(out, x, dim=-1)
    assert cos.min() > 0.99, cos.min()
    # The noisy query itself was far from the pattern; retrieval is what cleaned it.
    assert F.cosine_similarity(noisy, x, dim=-1).max() < 0.95
    # ... and the retrieved pattern is the right one for every query.
    assert torch.equal((out @ x.T).argmax(-1), torch.arange(n))


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_energy_never_increases(beta: float) -> None:
    """(b) E(xi) = -lse(beta, X xi) + xi^T xi / 2 + const is non-increasing along the updates."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    xi = 3 * torch.randn(16, 8, generator=g, dtype=torch.float64)  # 16 independent state patterns
    energies = [hopfield_energy(xi, x, beta)]
    for _ in range(8):
        xi = hopfield_update(xi, x, beta, steps=1)
        energies.append(hopfield_energy(xi, x, beta))
    e = torch.stack(energies)  # (steps + 1, 16)
    assert (e[1:] <= e[:-1] + 1e-12).all()
    assert (e[-1] < e[0] - 1e-3).all()  # and it really moves
    assert (e >= -1e-12).all()  # the constants make E non-negative


def test_energy_formula() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    xi = torch.randn(3, generator=g, dtype=torch.float64)
    beta = 0.8
    lse = math.log(sum(math.exp(beta * float(x[i] @ xi)) for i in range(5))) / beta
    m = max(float(x[i].norm()) for i in range(5))
    expected = -lse + 0.5 * float(xi @ xi) + math.log(5) / beta + 0.5 * m * m
    assert abs(float(hopfield_energy(xi[None], x, beta)[0]) - expected) < 1e-12


def identity_mixer(d: int, **options) -> mixers.Mixer:
    m = mixers.build("hopfield", d_model=d, n_heads=1, rope=False, **options).double()
    with torch.no_grad():
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
            lin.weight.copy_(torch.eye(d, dtype=torch.float64))
    return m


def test_one_step_with_identity_projections_is_softmax_attention() -> None:
    """(c) update_steps=1, identity projections: exactly causal softmax attention, scale beta."""
    d = 16
    m = identity_mixer(d)
    x = torch.randn(2, 21, d, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
    ref = F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None], is_causal=True)[:, 0]
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    assert m.config.beta == 1 / math.sqrt(d)


def dense_hopfield(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float, steps: int, window=None):
    """Per query row: steps-1 explicit updates in key space over its allowed past, then read values."""
    t = q.shape[-2]
    out = torch.empty_like(q)
    for i in range(t):
        lo = 0 if window is None else max(0, i - window + 1)
        keys, vals, xi = k[..., lo : i + 1, :], v[..., lo : i + 1, :], q[..., i, :]
        for _ in range(steps - 1):
            p = torch.softmax(beta * torch.einsum("...nd,...d->...n", keys, xi), -1)
            xi = torch.einsum("...n,...nd->...d", p, keys)
        p = torch.softmax(beta * torch.einsum("...nd,...d->...n", keys, xi), -1)
        out[..., i, :] = torch.einsum("...n,...nd->...d", p, vals)
    return out


@pytest.mark.parametrize(("steps", "window"), [(1, None), (3, None), (2, 4), (4, 1)])
def test_multi_step_mixer_matches_dense_reference(steps: int, window: int | None) -> None:
    torch.manual_seed(0)
    d, h = 16, 2
    m = mixers.build("hopfield", d_model=d, n_heads=h, update_steps=steps, window=window, beta=0.6).double()
    x = torch.randn(2, 15, d, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        b, t = 2, 15
        q, k, v = (p(x).view(b, t, h, -1).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
        pos = torch.arange(t)
        o = dense_hopfield(rotary(q, pos), rotary(k, pos), v, 0.6, steps, window)
        ref = m.o_proj(o.transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)


def test_fixed_points_single_pattern_and_global_average() -> None:
    """Large beta: a stored pattern is a fixed point. Tiny beta: the update returns the mean pattern
    (the paper's single-pattern and global-average fixed points)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hopfield_update(x, x, beta=4.0, steps=5), x, atol=1e-9, rtol=0)
    xi = torch.randn(3, 32, generator=g, dtype=torch.float64)
    mean = x.mean(0).expand(3, 32)
    torch.testing.assert_close(hopfield_update(xi, x, beta=1e-9, steps=1), mean, atol=1e-7, rtol=0)


def test_window_bounds_the_state() -> None:
    m = mixers.build("hopfield", d_model=16, n_heads=2, window=5).double()
    x = torch.randn(1, 60, 16, dtype=torch.float64)
    with torch.no_grad():
        full, s_full = m(x)
        a, s = m(x[:, :7])
        b, s = m(x[:, 7:8], state=s)
        c, s = m(x[:, 8:], state=s)
        _, s_short = m(x[:, :20])
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=ATOL, rtol=0)
    assert s_full["k"].shape[2] == 4
    assert mixers.state_nbytes(s_full) == mixers.state_nbytes(s_short) == 2 * 8 * 2 * 4 * 8
    unbounded = mixers.build("hopfield", d_model=16, n_heads=2).double()
    with torch.no_grad():
        _, s = unbounded(x)
    assert mixers.state_nbytes(s) == 2 * 8 * 2 * 60 * 8


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"update_steps": 0}, "update_steps"),
        ({"window": 0}, "window"),
        ({"n_heads": 3}, "n_heads"),
        ({"n_heads": 16}, "rope"),
        ({"separation": 2}, "separation"),
    ],
)
def test_config_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixers.build("hopfield", d_model=16, **options)


def test_function_input_errors() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="xi must"):
        hopfield_update(torch.randn(1, 5, dtype=torch.float64), x, 1.0)
    with pytest.raises(ValueError, match="beta"):
        hopfield_update(torch.randn(1, 3, dtype=torch.float64), x, 0.0)
    with pytest.raises(ValueError, match="steps"):
        hopfield_update(torch.randn(1, 3, dtype=torch.float64), x, 1.0, steps=-1)
    with pytest.raises(ValueError, match="xi must"):
        hopfield_energy(torch.randn(3, dtype=torch.float64), x, 1.0)
