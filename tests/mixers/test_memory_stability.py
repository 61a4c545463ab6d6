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


def lm_gradient_norm(lm: LM, seq_len: int) -> torch.Tensor:
    """Gradient norm of the next-token loss of 2 random sequences of seq_len tokens (vocab 64);
    the loss itself must be finite."""
    ids = torch.randint(0, 64, (2, seq_len))
    logits, _ = lm(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    return grad_norm([p.grad for p in lm.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", list(CASES))
def test_two_layer_lm_gradient_is_bounded(name: str) -> None:
    """The passkey setting: a 2-layer LM, 2 x 2048 random tokens (32 chunks), next-token loss."""
    torch.manual_seed(0)
    norm = lm_gradient_norm(LM.from_mixer(name, vocab_size=64, **SIZE, **CASES[name]), 2048)
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


# The passkey_h200 suite's delta-rule Titans (a linear memory, summed bias, a step of up to 1).
DELTA = {
    "mem_depth": 1,
    "lr_max": 1.0,
    "mem_loss_mean": False,
    "mem_max_grad_norm": 1e6,
    "mem_momentum_init": 0.001,
}


def test_mac_delta_lm_gradient_is_bounded() -> None:
    """titans_mac_delta ended passkey_h200 in NaN. MAC reads the memory into its attention (h)
    and writes the attention output y back: raw, a memory that grows (the delta rule's chunk step
    expands it here from the first chunks) grew y, which grew the writes. At init y reached an
    RMS of 3e4 within 1024 tokens and this LM's gradient was 8e4; normalising y before the memory
    and the memory's reads per head bounds the loop (gradient ~5)."""
    torch.manual_seed(0)
    lm = LM.from_mixer("titans_mac", vocab_size=64, **SIZE, n_persistent=4, short_conv=4, **DELTA)
    norm = lm_gradient_norm(lm, 1024)
    assert norm < 1e2, f"titans_mac_delta: LM gradient norm {norm:.3g} at 1024 tokens"


@pytest.mark.parametrize("name", ["titans_mac", "titans_mal"])
def test_output_does_not_scale_with_the_memory(name: str) -> None:
    """MAC and MAL feed the memory's read into their attention. Raw, the read scales with the
    memory weights, which the outer loop moves by orders of magnitude: titans_mal's grew from 85
    to 1e4 within 150 CPU passkey steps (loss 10 at 1k tokens, gradients to 6e5; NaN on the
    H100), and a memory 10x / 100x its initial size made the output 30x / 3000x larger. The reads
    are normalised per head, so the output is the same whatever the memory's scale."""
    extra = {"window": 64} if name == "titans_mal" else {}
    x = torch.randn(1, 256, 128, generator=torch.Generator().manual_seed(1))
    outs = []
    for scale in (1.0, 100.0):
        torch.manual_seed(0)
        layer = mixers.build(name, **SIZE, n_persistent=4, **extra)
        with torch.no_grad():
            for p in layer.memory.core.init_acc:
                p.mul_(scale)  # a 2-layer memory: its reads scale by ~scale^2
            outs.append(layer(x)[0])
    rms = [o.pow(2).mean().sqrt().item() for o in outs]
    assert 0.5 < rms[1] / rms[0] < 2, f"{name}: output RMS {rms[0]:.3g} -> {rms[1]:.3g} with a 100x memory"
