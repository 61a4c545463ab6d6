"""Combiner: the factorised attention equals the dense matrix of its written-out probabilities, and
every position receives information from every earlier one."""

from __future__ import annotations

import math

import pytest
import torch

from memlab import mixers

D = 16
SPAN = 3


def make(seed: int = 0, **cfg) -> mixers.Mixer:
    torch.manual_seed(seed)
    opts = {"n_heads": 2, "span": SPAN, "factorization": "mixture", **cfg}
    return mixers.build("combiner", d_model=D, **opts).double().eval()


def run_chunks(m: mixers.Mixer, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, outs, i = None, [], 0
    for n in sizes:
        y, state = m(x[:, i : i + n], state=state)
        outs.append(y)
        i += n
    return torch.cat(outs, dim=1)


def partition(i: int, span: int, plan: str) -> tuple[list[int], list[list[int]]]:
    """Direct support and regions of query i (the paper's Combiner-Fixed / Combiner-Axial LM plans)."""
    row, col = divmod(i, span)
    direct = list(range(row * span, i + 1))
    if plan == "fixed":
        regions = [list(range(r * span, (r + 1) * span)) for r in range(row)]
    else:
        direct += [a * span + col for a in range(row)]
        regions = [[a * span + r for a in range(row)] for r in range(span) if r != col] if row else []
    return direct, regions


def effective_probabilities(m: mixers.Mixer, x: torch.Tensor, plan: str) -> torch.Tensor:
    """(B, H, T, T) matrix q(j|i) of equation (8), term by term."""
    b, t, _ = x.shape
    q, k, _ = m.project(x, 0)
    scale = 1.0 / math.sqrt(m.head_dim)
    probs = torch.zeros(b, m.n_heads, t, t, dtype=x.dtype)
    for bi in range(b):
        for h in range(m.n_heads):
            qi_, ki_ = q[bi, h], k[bi, h]
            for i in range(t):
                direct, regions = partition(i, m.config.span, plan)
                logits = [qi_[i] @ ki_[j] * scale for j in direct]
                logits += [qi_[i] @ ki_[reg].amax(0) * scale for reg in regions]
                p = torch.softmax(torch.stack(logits), 0)
                for j, pj in zip(direct, p[: len(direct)], strict=True):
                    probs[bi, h, i, j] += pj
                for reg, p_reg in zip(regions, p[len(direct) :], strict=True):
                    inner = torch.softmax(torch.stack([qi_[reg].amax(0) @ ki_[j] * scale for j in reg]), 0)
                    for j, pj in zip(reg, inner, strict=True):
                        probs[bi, h, i, j] += p_reg * pj
    return probs


def dense_reference(m: mixers.Mixer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    plan = m.config.factorization
    plans = ["fixed", "axial"] if plan == "mixture" else [plan]
    probs = sum(effective_probabilities(m, x, p) for p in plans) / len(plans)
    _, _, v = m.project(x, 0)
    o = probs @ v
    return m.o_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)), probs


@pytest.mark.parametrize("plan", ["fixed", "axial", "mixture"])
def test_matches_dense_factorised_probabilities(plan: str) -> None:
    m = make(factorization=plan)
    x = torch.randn(2, 14, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        want, probs = dense_reference(m, x)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=0)
    # a valid conditional distribution with full support: every earlier position has weight
    causal = torch.tril(torch.ones(14, 14, dtype=torch.bool))
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-12, rtol=0)
    assert (probs[..., causal] > 0).all() and (probs[..., ~causal] == 0).all()


@pytest.mark.parametrize("plan", ["fixed", "axial", "mixture"])
def test_every_position_reaches_every_earlier_one(plan: str) -> None:
    """d y_t / d x_s is nonzero for every s <= t (and zero for s > t)."""
    m = make(factorization=plan, span=4)
    t = 18
    x = torch.randn(1, t, D, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    for pos in range(t):
        (grad,) = torch.autograd.grad(y[0, pos].sum(), x, retain_graph=True)
        reach = grad[0].abs().sum(-1)
        assert (reach[: pos + 1] > 0).all(), (plan, pos)
        assert (reach[pos + 1 :] == 0).all()


@pytest.mark.parametrize("plan", ["fixed", "axial"])
def test_forward_equals_chunked_and_decode(plan: str) -> None:
    m = make(factorization=plan)
    x = torch.randn(2, 25, D, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        for sizes in ([5, 1, 9, 8, 2], [3, 3, 7, 12], [1] * 25):
            torch.testing.assert_close(run_chunks(m, x, sizes), full, atol=1e-10, rtol=0)


def test_fixed_state_is_sublinear() -> None:
    """Fixed keeps one (key, summary) pair per completed row and the partial row; axial keeps all."""
    fixed, axial = make(factorization="fixed", span=8), make(factorization="axial", span=8)
    x = torch.randn(1, 124, D, dtype=torch.float64)
    with torch.no_grad():
        _, sf = fixed(x)
        _, sa = axial(x)
    assert sf["sum_k"].shape[2] == 15 and sf["k"].shape[2] == 4 and sf["row_q"].shape[2] == 4
    assert sa["k"].shape[2] == 124
    assert mixers.state_nbytes(sf) * 3 < mixers.state_nbytes(sa)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"span": 0}, "span"),
        ({"n_heads": 3}, "n_heads"),
        ({"factorization": "logsparse"}, "factorization"),
    ],
)
def test_config_errors(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixers.build("combiner", d_model=D, **cfg)
