"""Titans: the chunked memory update against sequential references, test-time learning, and the
structure of the three variants (what each output can and cannot depend on)."""

from __future__ import annotations

import math

import pytest
import torch

from memlab import mixers
from memlab.mixers.assoc_memory import (
    AssocMemory,
    mlp_backward,
    mlp_forward,
    reference_update,
    weighted_grads,
)
from memlab.mixers.assoc_objectives import (
    DecayRetention,
    LpBias,
)
from memlab.mixers.neural_memory import NeuralMemory
from memlab.mixers.titans import window_attention

DT = torch.float64


def titans_core(
    depth: int = 2, residual_norm: bool = True, dim: int = 6, max_grad_norm: float | None = None
) -> AssocMemory:
    return AssocMemory(
        n_heads=2,
        dim=dim,
        depth=depth,
        expansion=2,
        residual_norm=residual_norm,
        bias=LpBias(2.0),
        retention=DecayRetention(),
        momentum=True,
        max_grad_norm=max_grad_norm,
    ).double()


def random_gates(b: int, h: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_keep = torch.nn.functional.logsigmoid(torch.randn(b, h, n, dtype=DT) + 2)
    lr = 0.3 * torch.rand(b, h, n, dtype=DT)
    log_mom = torch.nn.functional.logsigmoid(torch.randn(b, h, n, dtype=DT) + 1)
    return log_keep, lr, log_mom


def unit(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=-1)


@pytest.mark.parametrize(("depth", "residual_norm"), [(1, False), (2, True), (3, True)])
def test_hand_written_backward_matches_autograd(depth: int, residual_norm: bool) -> None:
    torch.manual_seed(0)
    dims = [5] + [7] * (depth - 1) + [5]
    ws = [
        torch.randn(2, 3, i, o, dtype=DT, requires_grad=True)
        for i, o in zip(dims[:-1], dims[1:], strict=True)
    ]
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    g = torch.randn(2, 3, 4, 5, dtype=DT)
    w = torch.rand(2, 3, 4, dtype=DT)
    out, cache = mlp_forward(ws, x, residual_norm)
    mine = weighted_grads(mlp_backward(ws, cache, g, residual_norm), w.unsqueeze(0))
    auto = torch.autograd.grad((w[..., None] * g * out).sum(), ws)
    for a, b in zip(mine, auto, strict=True):
        torch.testing.assert_close(a[0], b, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("residual_norm", "max_grad_norm"), [(True, None), (False, None), (False, 0.5), (True, 0.05)]
)
def test_chunk_update_equals_token_by_token_recurrence(
    residual_norm: bool, max_grad_norm: float | None
) -> None:
    """The closed form (cumulative products of gates) == S, M recurrences run token by token,
    also with each token's gradient soft-clipped (its norm taken from autograd in the reference)."""
    torch.manual_seed(1)
    core = titans_core(residual_norm=residual_norm, max_grad_norm=max_grad_norm)
    st = core.init_state(2)
    # a non-zero incoming momentum exercises the S_0 terms of the closed form
    st = {k: v + 0.1 * torch.randn_like(v) for k, v in st.items()}
    k, v = unit(torch.randn(2, 2, 5, 6, dtype=DT)), torch.randn(2, 2, 5, 6, dtype=DT)
    log_keep, lr, log_mom = random_gates(2, 2, 5)
    with torch.no_grad():
        fast = core.update(st, k, v, log_keep, lr, log_mom)
        slow = reference_update(core, st, k, v, log_keep, lr, log_mom)
    assert set(fast) == set(slow) == {"mem.w0", "mem.w1", "mem.s0", "mem.s1"}
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-12, rtol=0)
        assert (fast[name] - st[name]).abs().max() > 1e-3  # the chunk did change the memory


def test_soft_clip_bounds_each_token_step() -> None:
    """Linear memory, one token: the step is theta * c tanh(|g|/c) g/|g| with |g| = 2 |e| |k|."""
    torch.manual_seed(9)
    core = titans_core(depth=1, residual_norm=False, max_grad_norm=0.5)
    st = core.init_state(1)
    k, v = unit(torch.randn(1, 2, 1, 6, dtype=DT)), 5 * torch.randn(1, 2, 1, 6, dtype=DT)
    zero = torch.zeros(1, 2, 1, dtype=DT)
    with torch.no_grad():
        new = core.update(st, k, v, zero, zero + 0.3, zero - 30.0)  # keep 1, momentum ~0
    err = torch.einsum("bhi,bhio->bho", k[:, :, 0], st["mem.w0"]) - v[:, :, 0]
    g = 2 * k[:, :, 0, :, None] * err[..., None, :]
    norm = torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True)
    want = st["mem.w0"] - 0.3 * 0.5 * torch.tanh(norm / 0.5) * g / norm
    torch.testing.assert_close(new["mem.w0"], want, atol=1e-12, rtol=0)
    step = torch.linalg.vector_norm(new["mem.w0"] - st["mem.w0"], dim=(-2, -1))
    assert (step <= 0.3 * 0.5 + 1e-12).all() and (norm > 5).all()  # a large error, a bounded move


def test_chunk_of_one_is_titans_online_update_in_closed_form() -> None:
    """Linear memory, chunk size 1: S_t = eta S - theta * 2 k (Mk - v)^T, M_t = (1 - alpha) M + S."""
    torch.manual_seed(2)
    core = titans_core(depth=1, residual_norm=False)
    st = core.init_state(1)
    m, s = st["mem.w0"].clone(), st["mem.s0"].clone()
    ks, vs = unit(torch.randn(1, 2, 6, 6, dtype=DT)), torch.randn(1, 2, 6, 6, dtype=DT)
    log_keep, lr, log_mom = random_gates(1, 2, 6)
    with torch.no_grad():
        for t in range(6):
            sl = slice(t, t + 1)
            st = core.update(st, ks[:, :, sl], vs[:, :, sl], log_keep[..., sl], lr[..., sl], log_mom[..., sl])
            k, v = ks[:, :, t], vs[:, :, t]  # (1, 2, 6)
            err = torch.einsum("bhi,bhio->bho", k, m) - v
            grad = 2 * k[..., :, None] * err[..., None, :]  # outer(k, 2e): W is (Din, Dout), out = k @ W
            s = log_mom[..., t].exp()[..., None, None] * s - lr[..., t][..., None, None] * grad
            m = log_keep[..., t].exp()[..., None, None] * m + s
            torch.testing.assert_close(st["mem.w0"], m, atol=1e-12, rtol=0)
            torch.testing.assert_close(st["mem.s0"], s, atol=1e-12, rtol=0)


def make_memory(chunk: int = 4) -> NeuralMemory:
    torch.manual_seed(3)
    return NeuralMemory(
        d_in=12,
        n_heads=2,
        head_dim=6,
        chunk_size=chunk,
        depth=2,
        expansion=2,
        residual_norm=True,
        conv_size=3,
        lr_max=0.5,
        bias=LpBias(2.0),
        retention=DecayRetention(),
        momentum=True,
    ).double()


def test_scan_reads_chunk_start_memory_and_updates_on_completion() -> None:
    """scan == a loop that reads each token from the memory as of its chunk's start and applies
    the sequential reference update when (and only when) a chunk completes."""
    mem = make_memory(chunk=4)
    x = torch.randn(2, 11, 12, dtype=DT)
    with torch.no_grad():
        fast, st_fast = mem.scan(x, mem.init_state(2, "cpu", DT))
        st = mem.init_state(2, "cpu", DT)
        q, _ = mem.queries(x, st["mem.conv_q"])
        k, v, g, _ = mem.writes(x, st["mem.conv_kv"])
        core_st = {n: t for n, t in st.items() if n.startswith("mem.w") or n.startswith("mem.s")}
        reads = []
        for t in range(11):
            reads.append(mem.core.evaluate(mem.core.weights(core_st), q[:, :, t : t + 1]))
            if t % 4 == 3:
                c = slice(t - 3, t + 1)
                core_st = reference_update(
                    mem.core, core_st, k[:, :, c], v[:, :, c], g[:, :, c, 0], g[:, :, c, 1], g[:, :, c, 2]
                )
    torch.testing.assert_close(fast, torch.cat(reads, dim=2), atol=1e-10, rtol=0)
    for name, val in core_st.items():
        torch.testing.assert_close(st_fast[name], val, atol=1e-10, rtol=0)
    assert st_fast["mem.n"] == 3  # tokens 8, 9, 10 wait in the buffer
    torch.testing.assert_close(st_fast["mem.k"][:, :, :3], k[:, :, 8:], atol=0, rtol=0)


@pytest.mark.parametrize(("depth", "residual_norm"), [(1, False), (2, True)])
def test_memory_learns_at_test_time(depth: int, residual_norm: bool) -> None:
    """After writing pairs (k_i, v_i), M(k_i) is closer to v_i: the associative loss drops."""
    torch.manual_seed(4)
    core = titans_core(depth=depth, residual_norm=residual_norm, dim=8)
    st = core.init_state(1)
    k, v = unit(torch.randn(1, 2, 16, 8, dtype=DT)), torch.randn(1, 2, 16, 8, dtype=DT)
    if residual_norm:  # targets the memory can reach: k + (a vector with zero mean, unit variance)
        v = k + torch.nn.functional.layer_norm(v, (8,))
    zero = torch.zeros(1, 2, 4, dtype=DT)
    with torch.no_grad():
        before = core.loss(core.weights(st), k, v, None)
        for c in range(4):  # four chunks of four pairs; keep 1, step 0.1, momentum 0.5
            sl = slice(4 * c, 4 * c + 4)
            st = core.update(st, k[:, :, sl], v[:, :, sl], zero, zero + 0.1, zero + math.log(0.5))
        after = core.loss(core.weights(st), k, v, None)
    assert after.mean() < 0.75 * before.mean(), (before.mean(), after.mean())
    assert (after < before).double().mean() > 0.75  # most pairs individually better recalled


def dense_window_reference(q, k, v, ck, cv, pk, pv, window):
    """Plain masked attention over [persistent | cache | new] (the spec of window_attention)."""
    t, n_cache = q.shape[2], ck.shape[2]
    keys, vals = torch.cat([pk, ck, k], 2), torch.cat([pv, cv, v], 2)
    scores = q @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5
    kpos = torch.arange(-n_cache, t)[None, :]
    qpos = torch.arange(t)[:, None]
    local = (kpos <= qpos) & (kpos > qpos - window)
    allowed = torch.cat([torch.ones(t, pk.shape[2], dtype=torch.bool), local], 1)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vals


@pytest.mark.parametrize(("t", "n_cache", "n_p"), [(3, 2, 2), (17, 0, 2), (17, 4, 0), (12, 3, 1)])
def test_window_attention_matches_dense_reference(t: int, n_cache: int, n_p: int) -> None:
    torch.manual_seed(5)
    w = 5
    q, k, v = (torch.randn(2, 3, t, 4, dtype=DT) for _ in range(3))
    ck, cv = (torch.randn(2, 3, n_cache, 4, dtype=DT) for _ in range(2))
    pk, pv = (torch.randn(2, 3, n_p, 4, dtype=DT) for _ in range(2))
    got = window_attention(q, k, v, ck, cv, pk, pv, w)
    torch.testing.assert_close(got, dense_window_reference(q, k, v, ck, cv, pk, pv, w), atol=1e-12, rtol=0)


def build(name: str, **over) -> mixers.Mixer:
    torch.manual_seed(6)
    cfg = {**mixers.MIXERS.get(name).test_config, **over}
    return mixers.build(name, d_model=32, **cfg).double().eval()


def freeze_memory(m: mixers.Mixer) -> None:
    """Step 0 and keep 1 exactly (float64 sigmoid saturates): the memory never changes."""
    gp = m.memory.gate_proj
    with torch.no_grad():
        gp.weight.zero_()
        b = gp.bias.view(m.memory.n_heads, m.memory.n_gates)
        b[:, 0] = 1e4  # log keep = logsigmoid(1e4) = 0
        b[:, 1] = -1e4  # step = lr_max * sigmoid(-1e4) = 0


def effect(m: mixers.Mixer, x: torch.Tensor, t: int) -> torch.Tensor:
    """Per-position max change of the output when token t is perturbed."""
    x2 = x.clone()
    x2[:, t] += torch.randn_like(x2[:, t])
    with torch.no_grad():
        return (m(x2)[0] - m(x)[0]).abs().amax(dim=(0, 2))


def test_mac_attention_is_segment_local_and_memory_carries_across() -> None:
    """Token 1 (segment 0) reaches segment 2 only through the long-term memory."""
    torch.manual_seed(7)
    x = torch.randn(2, 12, 32, dtype=DT)
    live = build("titans_mac", conv_size=1)  # no conv: it would carry token 1 a few steps further
    assert effect(live, x, 1)[8:].min() > 1e-6
    frozen = build("titans_mac", conv_size=1)
    freeze_memory(frozen)
    d = effect(frozen, x, 1)
    assert d[1:4].min() > 1e-6  # its own segment still sees it
    assert d[8:].max() < 1e-12


def test_mac_memory_changes_only_when_a_segment_completes() -> None:
    m = build("titans_mac")
    x = torch.randn(1, 7, 32, dtype=DT)
    init = m.init_state(1, "cpu", DT)
    with torch.no_grad():
        _, st3 = m(x[:, :3])
        _, st4 = m(x[:, 3:4], state=st3)
        _, st7 = m(x[:, 4:], state=st4)
    assert torch.equal(st3["mem.w0"], init["mem.w0"]) and st3["mem.n"] == 3
    assert (st4["mem.w0"] - init["mem.w0"]).abs().max() > 1e-6 and st4["mem.n"] == 0
    assert torch.equal(st7["mem.w0"], st4["mem.w0"]) and st7["mem.n"] == 3


@pytest.mark.parametrize("name", ["titans_mag", "titans_mal"])
def test_window_variants_reach_past_the_window_only_through_memory(name: str) -> None:
    torch.manual_seed(8)
    x = torch.randn(2, 20, 32, dtype=DT)  # window 6, chunk 4
    live = build(name, conv_size=1)  # no conv: it would widen the reach by conv_size - 1
    assert effect(live, x, 2)[8:].min() > 1e-6
    frozen = build(name, conv_size=1)
    freeze_memory(frozen)
    d = effect(frozen, x, 2)
    assert d[2:8].min() > 1e-6  # inside the window of token 2
    assert d[8:].max() < 1e-12  # beyond it (and beyond the conv), nothing


@pytest.mark.parametrize("name", ["titans_mac", "titans_mag", "titans_mal"])
def test_persistent_tokens_reach_every_position(name: str) -> None:
    m = build(name)
    x = torch.randn(1, 9, 32, dtype=DT)
    with torch.no_grad():
        y0, _ = m(x)
        m.persistent.add_(torch.randn_like(m.persistent))
        y1, _ = m(x)
    assert (y1 - y0).abs().amax(dim=(0, 2)).min() > 1e-6


def test_outer_loss_trains_the_write_path() -> None:
    """Gradients reach the key/value projections through the memory update (meta-learning)."""
    m = build("titans_mag").train()
    x = torch.randn(2, 12, 32, dtype=DT)
    y, _ = m(x)
    y[:, 8:].pow(2).sum().backward()
    g = m.memory.kv_proj.proj.weight.grad
    assert g is not None and g.abs().max() > 1e-8


@pytest.mark.parametrize(
    ("name", "over", "match"),
    [
        ("titans_mac", {"chunk_size": 0}, "chunk_size must be a positive int, got 0"),
        ("titans_mag", {"n_heads": 5}, "n_heads=5 must divide d_model=32"),
        ("titans_mal", {"window": 0}, "window must be a positive int, got 0"),
        ("titans_mac", {"n_persistent": -1}, "n_persistent must be an int >= 0, got -1"),
        ("titans_mag", {"lr_max": 0.0}, "lr_max must be > 0, got 0.0"),
        ("titans_mal", {"conv_size": -2}, "conv_size must be an int >= 0, got -2"),
        ("titans_mac", {"mem_depth": 0}, "mem_depth must be a positive int, got 0"),
        ("titans_mag", {"mem_max_grad_norm": -1.0}, "mem_max_grad_norm must be None or > 0, got -1.0"),
    ],
)
def test_config_errors_name_the_value(name: str, over: dict, match: str) -> None:
    cfg = {**mixers.MIXERS.get(name).test_config, **over}
    with pytest.raises(ValueError, match=match):
        mixers.build(name, d_model=32, **cfg)
