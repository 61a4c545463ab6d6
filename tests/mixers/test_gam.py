"""GAM: parallel == step-by-step, the gates select the paths as specified, the memory path is
per-token (token t's lookup depends only on token t), the conv path's receptive field, and
config errors."""

from __future__ import annotations

import pytest
import torch

from memlab import mixers
from memlab.mixers.gam import GatedAssociativeMemory

DT = torch.float64
D = 12


def make(**options) -> GatedAssociativeMemory:
    torch.manual_seed(0)
    return mixers.build("gam", d_model=D, **{"n_slots": 16, **options}).double().eval()


def set_gates(m: GatedAssociativeMemory, local: float, memory: float) -> None:
    """Constant gate pre-activations: sigmoid(local) on the conv path, sigmoid(memory) on the lookup."""
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias[:D] = local
        m.gate.bias[D:] = memory


def conv_reference(m: GatedAssociativeMemory, x: torch.Tensor) -> torch.Tensor:
    k = m.config.conv_kernel
    w, b = m.conv.weight[:, 0], m.conv.bias  # (D, K), (D,)
    out = torch.zeros_like(x) + b
    for t in range(x.shape[1]):
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                out[:, t] += w[:, j] * x[:, src]
    return out


def memory_reference(m: GatedAssociativeMemory, x: torch.Tensor) -> torch.Tensor:
    mem = m.memory
    return torch.softmax(x @ mem.T, dim=-1) @ mem


def test_parallel_equals_step_by_step() -> None:
    m = make(conv_kernel=4)
    x = torch.randn(3, 17, D, dtype=DT)
    with torch.no_grad():
        full, _ = m(x)
        state, steps = None, []
        for t in range(17):
            y, state = m(x[:, t : t + 1], state=state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(state["conv"], x[:, -3:].transpose(1, 2), atol=0, rtol=0)


def test_full_output_matches_formula() -> None:
    m = make()
    x = torch.randn(2, 9, D, dtype=DT)
    with torch.no_grad():
        y, _ = m(x)
        g = x @ m.gate.weight.T + m.gate.bias
        ref = torch.sigmoid(g[..., :D]) * conv_reference(m, x)
        ref = ref + torch.sigmoid(g[..., D:]) * memory_reference(m, x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)


def test_gate_open_on_local_gives_conv_path() -> None:
    m = make()
    set_gates(m, local=60.0, memory=-60.0)  # sigmoid(60) == 1 and sigmoid(-60) ~ 1e-26 in float64
    x = torch.randn(2, 11, D, dtype=DT)
    with torch.no_grad():
        y, _ = m(x)
    torch.testing.assert_close(y, conv_reference(m, x), atol=1e-12, rtol=0)


def test_gate_open_on_memory_gives_memory_path() -> None:
    m = make()
    set_gates(m, local=-60.0, memory=60.0)
    x = torch.randn(2, 11, D, dtype=DT)
    with torch.no_grad():
        y, _ = m(x)
    torch.testing.assert_close(y, memory_reference(m, x), atol=1e-12, rtol=0)


def test_gates_are_independent_not_complementary() -> None:
    m = make()
    x = torch.randn(2, 7, D, dtype=DT)
    with torch.no_grad():
        set_gates(m, local=60.0, memory=60.0)
        both, _ = m(x)
        set_gates(m, local=0.0, memory=0.0)
        half, _ = m(x)
        set_gates(m, local=-60.0, memory=-60.0)
        none, _ = m(x)
    total = conv_reference(m, x) + memory_reference(m, x)
    torch.testing.assert_close(both, total, atol=1e-12, rtol=0)
    torch.testing.assert_close(half, 0.5 * total, atol=1e-12, rtol=0)
    assert none.abs().max() < 1e-20


def test_memory_path_of_token_depends_only_on_that_token() -> None:
    m = make(conv_kernel=3)
    set_gates(m, local=-60.0, memory=60.0)
    x = torch.randn(2, 15, D, dtype=DT)
    t = 9
    with torch.no_grad():
        y0, _ = m(x)
        for s in (0, 5, 8, 10, 14):  # other tokens, including the conv window and the future
            x2 = x.clone()
            x2[:, s] += 5 * torch.randn(2, D, dtype=DT)
            y1, _ = m(x2)
            torch.testing.assert_close(y1[:, t], y0[:, t], atol=1e-12, rtol=0)
        x2 = x.clone()
        x2[:, t] += 5 * torch.randn(2, D, dtype=DT)
        y1, _ = m(x2)
        assert (y1[:, t] - y0[:, t]).abs().max() > 1e-3
        # The same token alone, with no history, gives the same lookup.
        alone, _ = m(x[:, t : t + 1])
    torch.testing.assert_close(alone[:, 0], y0[:, t], atol=1e-12, rtol=0)


def test_memory_retrieves_nearest_slot() -> None:
    # With an orthonormal bank, a query aligned with slot j returns (nearly) slot j: a content lookup.
    m = make(n_slots=D)
    with torch.no_grad():
        m.memory.copy_(torch.eye(D, dtype=DT))
        x = 40.0 * torch.eye(D, dtype=DT)[None]  # token j queries slot j
        out = m.memory_path(x)
    torch.testing.assert_close(out, torch.eye(D, dtype=DT)[None], atol=1e-15, rtol=0, check_dtype=False)


def test_receptive_field_is_the_conv_kernel() -> None:
    # Nothing but the conv mixes tokens: y_t ignores every token before t - (K - 1).
    k = 4
    m = make(conv_kernel=k)
    x = torch.randn(2, 20, D, dtype=DT)
    t = 15
    with torch.no_grad():
        y0, _ = m(x)
        x2 = x.clone()
        x2[:, : t - (k - 1)] = torch.randn(2, t - (k - 1), D, dtype=DT)
        y1, _ = m(x2)
        torch.testing.assert_close(y1[:, t:], y0[:, t:], atol=1e-12, rtol=0)
        x3 = x.clone()
        x3[:, t - (k - 1)] += 1.0
        y3, _ = m(x3)
    assert (y3[:, t] - y0[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize(
    ("options", "field"), [({"conv_kernel": 0}, "conv_kernel"), ({"n_slots": 0}, "n_slots")]
)
def test_config_errors(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        mixers.build("gam", d_model=8, **options)
