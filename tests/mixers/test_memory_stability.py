"""Regression tests for the passkey_h200 divergence of the chunked neural memories.

On passkey (2048-token sequences, chunk_size 64, n_heads 2, d_model 128) titans_mac, titans_mag,
moneta and yaad trained to a NaN loss. The forward pass stayed finite; the gradient of the outer
loss grew geometrically with the number of chunks it flows back through (titans_mac at init:
~5e1 over 2 chunks, 4e3 over 8, 2e8 over 16, 3e16 over 32), overflowed float32, and
``clip_grad_norm_`` of an inf norm turned every parameter into NaN. The per-chunk update of the
2-layer memory was expansive (steps too large for its curvature; Moneta's l_q mirror map had a
gain of ~74); yaad, titans_mal and memora stayed finite but their memory decayed to ~0 (weights
1e-19 over 4096 tokens), where a 2-layer MLP's gradients vanish. The defaults now average the
bias over the value dim, scale the l_q regulariser to the matrix size and forget 5e-4 per token
at init (see ``AssocMemoryConfig``).

Each test runs every memory mixer at the failing size (d_model 128, head dim 64, chunk 64):
(i) one layer over 64 chunks of unit-RMS input (what the LM's pre-norm feeds it), loss on the
last chunk; (ii) a 2-layer LM on random tokens; (iii) the memory's reads do not collapse.
"""

from __future__ import annotations

import pytest
import torch

from memlab import mixers
from memlab.models.lm import LM

CASES = {
    "titans_mac": {"n_persistent": 4},
    "titans_mag": {"n_persistent": 4, "window": 64},
    "titans_mal": {"n_persistent": 4, "window": 64},
    "moneta": {},
    "yaad": {},
    "memora": {},
}
SIZE = {"d_model": 128, "n_heads": 2, "chunk_size": 64}


def grad_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    assert all(torch.isfinite(g).all() for g in tensors)
    return torch.sqrt(sum(g.pow(2).sum() for g in tensors))


@pytest.mark.parametrize("name", list(CASES))
def test_long_sequence_outputs_and_grads_finite(name: str) -> None:
    torch.manual_seed(0)
    layer = mixers.build(name, **SIZE, **CASES[name])
    x = torch.randn(1, 64 * 64, 128, requires_grad=True)
    y, _ = layer(x)
    assert torch.isfinite(y).all()
    # the loss reads the last chunk only: its gradient reaches the start through 63 chunk updates
    y[:, -64:].pow(2).mean().backward()
    norm = grad_norm([p.grad for p in layer.parameters() if p.grad is not None] + [x.grad])
    assert norm < 1e4, f"{name}: gradient norm {norm:.3g} after 64 chunks"


@pytest.mark.parametrize("name", list(CASES))
def test_two_layer_lm_gradient_is_bounded(name: str) -> None:
    """The passkey setting: a 2-layer LM, 2 x 2048 random tokens (32 chunks), next-token loss."""
    torch.manual_seed(0)
    lm = LM.from_mixer(name, vocab_size=64, **SIZE, **CASES[name])
    ids = torch.randint(0, 64, (2, 2048))
    logits, _ = lm(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    norm = grad_norm([p.grad for p in lm.parameters() if p.grad is not None])
    assert norm < 1e4, f"{name}: LM gradient norm {norm:.3g} at 2048 tokens"


@pytest.mark.parametrize("name", list(CASES))
def test_memory_does_not_collapse_over_4096_tokens(name: str) -> None:
    """The reads at the last of 64 chunks are not vanishing next to those at the first."""
    torch.manual_seed(0)
    layer = mixers.build(name, **SIZE, **CASES[name])
    x = torch.randn(1, 64 * 64, 128)
    with torch.no_grad():
        reads, _ = layer.memory.scan(x, layer.memory.init_state(1, "cpu", torch.float32))
    assert torch.isfinite(reads).all()
    rms = reads.pow(2).mean((0, 1, 3)).sqrt()  # (T,)
    ratio = rms[-64:].mean() / rms[:64].mean()
    assert ratio > 1e-3, f"{name}: last-chunk reads {ratio:.3g} x the first chunk's"
