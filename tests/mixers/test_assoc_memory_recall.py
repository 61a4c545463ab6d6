"""The associative memory as a recall store: configured like DeltaNet (linear memory, summed L2
bias, step 1 on unit-norm keys, no decay, no momentum) one write of k -> v makes M(k) = v, in any
chunking; and the Yaad threshold option that puts its Huber bias in that (L2) regime."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlab import mixers
from memlab.mixers.assoc_objectives import DecayRetention, HuberBias, LpBias
from memlab.mixers.neural_memory import NeuralMemory

D = 16


def delta_memory(chunk: int, momentum: bool, bias=None, lr_max: float = 1.0) -> NeuralMemory:
    nm = NeuralMemory(
        d_in=D,
        n_heads=1,
        head_dim=D,
        chunk_size=chunk,
        depth=1,
        expansion=1,
        residual_norm=False,
        conv_size=0,
        lr_max=lr_max,
        bias=LpBias(2.0) if bias is None else bias,
        retention=DecayRetention(),
        momentum=momentum,
        max_grad_norm=None,
        loss_mean=False,
        forget_init=1e-6,
        momentum_init=1e-6,
    ).double()
    with torch.no_grad():
        nm.core.init_acc[0].zero_()
    return nm


def gates(t: int, theta: float, momentum: bool, extra: float | None = None) -> torch.Tensor:
    parts = [torch.zeros(1, 1, t), torch.full((1, 1, t), theta)]  # keep 1, step theta
    if momentum:
        parts.append(torch.full((1, 1, t), -40.0))  # eta ~ 0
    if extra is not None:
        parts.append(torch.full((1, 1, t), extra))
    return torch.stack(parts, dim=-1).double()


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_delta_rule_write_then_read_returns_the_value(chunk: int, momentum: bool) -> None:
    """Orthonormal unit keys, theta = 1/2 on ||M(k) - v||^2 (gradient 2e): M(k_i) = v_i exactly."""
    torch.manual_seed(0)
    t = 8
    k = torch.linalg.qr(torch.randn(D, t, dtype=torch.float64))[0].T[None, None]  # (1, 1, t, D)
    v = torch.randn(1, 1, t, D, dtype=torch.float64)
    nm = delta_memory(chunk, momentum)
    st = nm.init_state(1, "cpu", torch.float64)
    g = gates(t, 0.5, momentum)
    for i in range(0, t, chunk):
        st = nm.absorb(st, k[:, :, i : i + chunk], v[:, :, i : i + chunk], g[:, :, i : i + chunk])
    torch.testing.assert_close(nm.read(st, k), v, atol=1e-10, rtol=1e-10)


def test_delta_rule_overwrites_an_old_value() -> None:
    """Writing k -> v2 after k -> v1 (token by token) leaves M(k) = v2: the error-correcting step."""
    torch.manual_seed(1)
    k = F.normalize(torch.randn(1, 1, 1, D, dtype=torch.float64), dim=-1).expand(1, 1, 2, D)
    v = torch.randn(1, 1, 2, D, dtype=torch.float64)
    nm = delta_memory(1, False)
    st = nm.init_state(1, "cpu", torch.float64)
    g = gates(2, 0.5, False)
    for i in range(2):
        st = nm.absorb(st, k[:, :, i : i + 1], v[:, :, i : i + 1], g[:, :, i : i + 1])
    torch.testing.assert_close(nm.read(st, k[:, :, :1]), v[:, :, 1:], atol=1e-10, rtol=1e-10)


def test_huber_in_its_l2_regime_is_the_delta_rule() -> None:
    """Yaad's bias with a threshold above every error and step 1 (gradient e) also stores k -> v."""
    torch.manual_seed(2)
    t = 8
    k = torch.linalg.qr(torch.randn(D, t, dtype=torch.float64))[0].T[None, None]
    v = 3 * torch.randn(1, 1, t, D, dtype=torch.float64)  # ||v|| ~ 12: far past delta = 1
    for delta, exact in ((1e3, True), (1.0, False)):
        nm = delta_memory(t, False, bias=HuberBias(), lr_max=2.0)
        st = nm.absorb(nm.init_state(1, "cpu", torch.float64), k, v, gates(t, 1.0, False, delta))
        err = (nm.read(st, k) - v).norm() / v.norm()
        assert (err < 1e-10) == exact, (delta, err.item())


@pytest.mark.parametrize("delta", [1.0, 100.0, 0.05])
def test_yaad_huber_delta_init(delta: float) -> None:
    cls = mixers.MIXERS.get("yaad")
    m = cls(cls.Config(**{**cls.test_config, "d_model": 16, "huber_delta_init": delta}))
    mem = m.memory
    init = F.softplus(mem.gate_proj.bias.view(mem.n_heads, mem.n_gates)[:, -1].double())
    assert torch.allclose(init, torch.full_like(init, delta), rtol=1e-4), init
    # the step and keep gates are untouched
    b = mem.gate_proj.bias.view(mem.n_heads, mem.n_gates)
    assert torch.all(b[:, 1] == 0)
    assert math.isclose(torch.sigmoid(b[0, 0]).item(), 1 - m.config.mem_forget_init, rel_tol=1e-5)


def test_yaad_huber_delta_init_must_be_positive() -> None:
    cls = mixers.MIXERS.get("yaad")
    with pytest.raises(ValueError, match="huber_delta_init"):
        cls.Config(**{**cls.test_config, "d_model": 16, "huber_delta_init": 0.0})
