"""Titans MAC / MAG: a token reaches later segments (MAC) or tokens past the window (MAG) only
through the long-term memory, and through it the dependence is non-zero.

With the memory frozen (step 0 and a data-independent keep gate, so a write changes nothing that
depends on the token) the output at a token two segments / more than a window later must not depend
on the early token at all; with the memory learning it must.
"""

from __future__ import annotations

import pytest
import torch

from memlab.mixers.base import build

D_MODEL, CHUNK = 16, 4
# token 1 (segment 0) and the output at token 13 (segment 3). The 4-tap convs reach back 3 tokens
# and so cross one segment boundary: x_1 reaches MAC's memory token at 4 (query conv), hence y at
# 4..7 and, through the conv of y's gate queries, the output at 8..10; nothing in segment 3.
# MAG's window 4 at token 13 sees tokens 10..13.
SRC, DST, N_SEG = 1, 13, 4


def _mixer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    opts = {"n_heads": 2, "chunk_size": CHUNK, "n_persistent": 2, "conv_size": 4}
    if name == "titans_mag":
        opts["window"] = 4
    return build(name, d_model=D_MODEL, **opts).double()


def _freeze_memory(mixer: torch.nn.Module) -> None:
    """Step 0 and a keep gate that ignores the input: every write leaves the memory as it was."""
    mem = mixer.memory
    with torch.no_grad():
        w = mem.gate_proj.weight.view(mem.n_heads, mem.n_gates, -1)
        b = mem.gate_proj.bias.view(mem.n_heads, mem.n_gates)
        w[:, :2] = 0.0  # log keep and step channels
        b[:, 1] = -1e4  # step = lr_max * sigmoid(-1e4) = 0


def _dependence(mixer: torch.nn.Module) -> float:
    x = torch.randn(2, N_SEG * CHUNK, D_MODEL, dtype=torch.float64, requires_grad=True)
    out, _ = mixer(x)
    (g,) = torch.autograd.grad((out[:, DST] * torch.randn_like(out[:, DST])).sum(), x)
    return g[:, SRC].abs().max().item()


@pytest.mark.parametrize("name", ["titans_mac", "titans_mag"])
def test_early_token_reaches_late_output_through_memory(name: str) -> None:
    assert _dependence(_mixer(name)) > 1e-6


@pytest.mark.parametrize("name", ["titans_mac", "titans_mag"])
def test_early_token_reaches_late_output_only_through_memory(name: str) -> None:
    mixer = _mixer(name)
    _freeze_memory(mixer)
    assert _dependence(mixer) == 0.0


def test_mac_step_by_step_matches_forward_on_the_memory_path() -> None:
    """The dependence through the memory is the same whole-sequence and token by token."""
    mixer = _mixer("titans_mac")
    x = torch.randn(1, N_SEG * CHUNK, D_MODEL, dtype=torch.float64)
    x2 = x.clone()
    x2[:, SRC] += 1.0
    full = mixer(x)[0][:, DST] - mixer(x2)[0][:, DST]

    def stepwise(inp: torch.Tensor) -> torch.Tensor:
        st, outs = None, []
        for t in range(inp.shape[1]):
            o, st = mixer(inp[:, t : t + 1], state=st)
            outs.append(o)
        return torch.cat(outs, dim=1)

    steps = stepwise(x)[:, DST] - stepwise(x2)[:, DST]
    assert full.abs().max() > 1e-6
    torch.testing.assert_close(steps, full, rtol=1e-6, atol=1e-9)
