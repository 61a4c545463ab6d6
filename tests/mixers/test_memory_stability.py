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


@pytest.mark.parametrize("depth", [1, 2])
def test_soft_clip_gradient_is_finite_where_a_token_writes_nothing(depth: int) -> None:
    """A token whose gradient vanishes in every memory layer (a zero key: every layer's input is
    zero) has a zero gradient norm. The soft clip's norm had a 0/0 gradient there (hypot), which
    turned a titans_mac training (no short conv, passkey on the CPU) into NaN at step 363."""
    from memlab.mixers.assoc_memory import AssocMemory, soft_clip_scale
    from memlab.mixers.assoc_objectives import DecayRetention, LpBias

    torch.manual_seed(0)
    core = AssocMemory(n_heads=2, dim=8, depth=depth, expansion=2, bias=LpBias(2.0),
                       retention=DecayRetention(), momentum=False, max_grad_norm=1.0)
    b, h, n = 2, 2, 5
    accs = [p.detach().unsqueeze(0).expand(b, *p.shape).clone().requires_grad_() for p in core.init_acc]
    factors = []
    for din, dout in core.shapes:
        a, d = torch.randn(b, h, n, din), torch.randn(b, h, n, dout)
        a[:, :, 2] = 0.0  # token 2 writes nothing in any layer
        factors.append((a.requires_grad_(), d.requires_grad_()))
    log_keep = torch.full((b, h, n), -0.01, requires_grad=True)
    lr = torch.full((b, h, n), 0.5, requires_grad=True)
    coefs = core.coefs(log_keep, lr, None)
    new, _ = core.apply(accs, None, factors, coefs)
    sum(t.square().sum() for t in new).backward()
    leaves = [*accs, *(t for pair in factors for t in pair), log_keep, lr]
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    # the values are the clip's: the same update with each token's step scaled by hand
    with torch.no_grad():
        norm = torch.stack([a.norm(dim=-1) * d.norm(dim=-1) for a, d in factors]).norm(dim=0)
        core.max_grad_norm = None
        w, *rest = coefs
        by_hand, _ = core.apply(accs, None, factors, (w * soft_clip_scale(norm, 1.0), *rest))
    for got, want in zip(new, by_hand, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
