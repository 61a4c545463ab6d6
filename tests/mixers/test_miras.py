"""Miras (Moneta, Yaad, Memora): each update against its closed form on small cases, the chunked
form against the token-by-token reference, test-time learning, and each objective's property."""

from __future__ import annotations

import math

import pytest
import torch

from memlab import mixers
from memlab.mixers.assoc_memory import (
    AssocMemory,
    reference_update,
)
from memlab.mixers.assoc_objectives import (
    AttentionalBias,
    DecayRetention,
    HuberBias,
    KLRetention,
    LpBias,
    LqRetention,
    Retention,
)

DT = torch.float64


def linear_core(bias: AttentionalBias, retention: Retention, dim: int = 5) -> AssocMemory:
    """Linear memory M(k) = k @ W, W: (Din, Dout), no momentum (the Miras models)."""
    core = AssocMemory(
        n_heads=2, dim=dim, depth=1, residual_norm=False, bias=bias, retention=retention, momentum=False
    )
    return core.double()


def token(b: int = 1, h: int = 2, n: int = 1, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.nn.functional.normalize(torch.randn(b, h, n, d, dtype=DT), dim=-1)
    return k, torch.randn(b, h, n, d, dtype=DT)


def gates(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.log(0.5 + 0.5 * torch.rand(1, 2, n, dtype=DT)), 0.5 * torch.rand(1, 2, n, dtype=DT)


def outer(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, H, D) x (B, H, D) -> (B, H, Din, Dout): the gradient of a linear memory's output."""
    return k[..., :, None] * g[..., None, :]


def lq_weights(a: torch.Tensor, q: float) -> torch.Tensor:
    """The l_q mirror map written out: sign(A) |A|^(r-1) / (c ||A||_r^(r-2)), r = q / (q - 1),
    for the normalised regulariser c/2 ||W||_q^2, c = n^(1 - 2/q) (n entries of the matrix)."""
    r = q / (q - 1)
    c = (a.shape[-2] * a.shape[-1]) ** (1 - 2 / q)
    norm = torch.linalg.vector_norm(a, ord=r, dim=(-2, -1), keepdim=True)
    return torch.sign(a) * a.abs() ** (r - 1) / norm ** (r - 2) / c


@pytest.mark.parametrize(("p", "q"), [(3.0, 4.0), (2.0, 2.0), (4.0, 3.0)])
def test_moneta_single_step_closed_form(p: float, q: float) -> None:
    """A_1 = a A_0 - eta p (sign(e) |e|^(p-1)) k^T,  W_1 = mirror map of A_1 for 1/2 ||W||_q^2."""
    torch.manual_seed(0)
    core = linear_core(LpBias(p), LqRetention(q, eps=0.0))
    st = core.init_state(1)
    k, v = token()
    log_keep, lr = gates()
    a0 = st["mem.w0"]
    w0 = lq_weights(a0, q)
    torch.testing.assert_close(core.weights(st)[0], w0, atol=1e-14, rtol=0)
    e = torch.einsum("bhi,bhio->bho", k[:, :, 0], w0) - v[:, :, 0]
    grad = outer(k[:, :, 0], p * torch.sign(e) * e.abs() ** (p - 1))
    a1 = log_keep.exp()[..., None] * a0 - lr[..., None] * grad
    with torch.no_grad():
        new = core.update(st, k, v, log_keep, lr)
    torch.testing.assert_close(new["mem.w0"], a1, atol=1e-13, rtol=0)
    torch.testing.assert_close(core.weights(new)[0], lq_weights(a1, q), atol=1e-13, rtol=0)


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("q", [3.0, 4.0])
def test_lq_retention_is_the_mirror_map_of_its_regulariser(q: float, normalized: bool) -> None:
    """W(A) inverts A = grad c/2 ||W||_q^2 (c = n^(1 - 2/q), or 1 unnormalised), is homogeneous of
    degree 1 (a decaying A shrinks W, never blows it up) and, for q > 2, flattens the entries
    (|W| grows slower than |A|)."""
    torch.manual_seed(10)
    ret = LqRetention(q, eps=0.0, normalized=normalized)
    w = torch.randn(2, 3, 5, 4, dtype=DT)
    a = ret.init_accumulator(w)
    c = 20 ** (1 - 2 / q) if normalized else 1.0
    with torch.enable_grad():
        wr = w.clone().requires_grad_(True)
        (c / 2 * torch.linalg.vector_norm(wr, ord=q, dim=(-2, -1)) ** 2).sum().backward()
    torch.testing.assert_close(a, wr.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret.weights(a), w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ret.weights(1e-3 * a), 1e-3 * ret.weights(a), atol=1e-15, rtol=1e-12)
    ratio = lambda t: t.abs().amax((-2, -1)) / t.abs().mean((-2, -1))  # noqa: E731
    assert (ratio(ret.weights(a)) < ratio(a)).all()


def test_moneta_p1_is_the_smoothed_sign_update() -> None:
    """p = 1: the value-less memory, W moves by eta sign(e) k^T (sign smoothed near 0)."""
    torch.manual_seed(1)
    core = linear_core(LpBias(1.0, eps=1e-12), LqRetention(2.0))
    st = core.init_state(1)
    k, v = token()
    v = v + 3 * torch.sign(v)  # errors far from 0, where the smoothing is invisible
    zero = torch.zeros(1, 2, 1, dtype=DT)
    with torch.no_grad():
        new = core.update(st, k, v, zero, zero + 0.1)
    e = torch.einsum("bhi,bhio->bho", k[:, :, 0], st["mem.w0"]) - v[:, :, 0]
    torch.testing.assert_close(
        new["mem.w0"], st["mem.w0"] - 0.1 * outer(k[:, :, 0], torch.sign(e)), atol=1e-9, rtol=0
    )


def test_moneta_chunk_is_weighted_sum_of_chunk_start_gradients() -> None:
    """Miras eq. 29 (linear memory, q=2): A_b = beta_b A_0 - sum_i eta_i beta_b/beta_i grad(W_0; k_i, v_i),
    i.e. K^T (w * p sign(E)|E|^(p-1)) with one matrix product over the chunk."""
    torch.manual_seed(2)
    core = linear_core(LpBias(3.0), LqRetention(2.0))
    st = core.init_state(1)
    k, v = token(n=6)
    log_keep, lr = gates(6)
    cum = log_keep.cumsum(-1)
    w = lr * (cum[..., -1:] - cum).exp()  # eta_i beta_b / beta_i
    e = k @ st["mem.w0"] - v  # (1, 2, 6, 5)
    grad_sum = k.transpose(-1, -2) @ (w[..., None] * 3 * torch.sign(e) * e.abs() ** 2)
    with torch.no_grad():
        new = core.update(st, k, v, log_keep, lr)
    torch.testing.assert_close(
        new["mem.w0"], cum[..., -1:, None].exp() * st["mem.w0"] - grad_sum, atol=1e-13, rtol=0
    )


def test_yaad_single_step_closed_form_in_both_regimes() -> None:
    """||e|| <= delta: W_1 = a W_0 - eta e k^T;  else W_1 = a W_0 - eta delta sign(e) k^T."""
    torch.manual_seed(3)
    core = linear_core(HuberBias(), DecayRetention())
    st = core.init_state(1)
    k, v = token()
    log_keep, lr = gates()
    w0 = st["mem.w0"]
    e = torch.einsum("bhi,bhio->bho", k[:, :, 0], w0) - v[:, :, 0]
    norm = torch.linalg.vector_norm(e, dim=-1)  # (1, 2)
    delta_big = (norm + 1.0)[..., None, None]  # both heads in the L2 regime
    delta_small = (0.5 * norm)[..., None, None]  # both heads in the L1 regime
    a = log_keep.exp()[..., None]
    with torch.no_grad():
        l2 = core.update(st, k, v, log_keep, lr, extra=delta_big)
        l1 = core.update(st, k, v, log_keep, lr, extra=delta_small)
    torch.testing.assert_close(
        l2["mem.w0"], a * w0 - lr[..., None] * outer(k[:, :, 0], e), atol=1e-13, rtol=0
    )
    step = delta_small[..., 0] * torch.sign(e)
    torch.testing.assert_close(
        l1["mem.w0"], a * w0 - lr[..., None] * outer(k[:, :, 0], step), atol=1e-13, rtol=0
    )


def test_yaad_bounds_the_pull_of_an_outlier() -> None:
    """An outlier value moves Yaad's memory by at most eta delta ||sign(e)|| ||k||, however far it
    is; the L2 objective (Titans, Memora) moves in proportion to the error."""
    torch.manual_seed(4)
    huber = linear_core(HuberBias(), DecayRetention())
    l2 = linear_core(LpBias(2.0), DecayRetention())
    l2.load_state_dict(huber.state_dict())
    k, v = token()
    zero = torch.zeros(1, 2, 1, dtype=DT)
    delta = torch.ones(1, 2, 1, 1, dtype=DT)
    moves = {}
    for scale in (10.0, 1000.0):
        with torch.no_grad():
            for name, core, extra in (("huber", huber, delta), ("l2", l2, None)):
                st = core.init_state(1)
                new = core.update(st, k, scale * v, zero, zero + 0.1, extra=extra)
                moves[name, scale] = torch.linalg.vector_norm(new["mem.w0"] - st["mem.w0"], dim=(-2, -1))
    bound = 0.1 * math.sqrt(5)  # eta * delta * ||sign(e)||_2 * ||k||_2
    assert (moves["huber", 1000.0] <= bound + 1e-12).all()
    torch.testing.assert_close(moves["huber", 1000.0], moves["huber", 10.0], atol=1e-12, rtol=0)
    assert (moves["l2", 1000.0] > 50 * moves["l2", 10.0]).all()


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_memora_single_step_closed_form(scale: float) -> None:
    """W_1 = c softmax(a log W_0 - eta 2 k e^T) over each column; columns stay on the simplex."""
    torch.manual_seed(5)
    core = linear_core(LpBias(2.0), KLRetention(scale))
    st = core.init_state(1)
    w0 = core.weights(st)[0]
    torch.testing.assert_close(w0.sum(-2), torch.full_like(w0.sum(-2), scale), atol=1e-13, rtol=0)
    k, v = token()
    log_keep, lr = gates()
    e = torch.einsum("bhi,bhio->bho", k[:, :, 0], w0) - v[:, :, 0]
    logits = log_keep.exp()[..., None] * torch.log(w0) - lr[..., None] * outer(k[:, :, 0], 2 * e)
    with torch.no_grad():
        w1 = core.weights(core.update(st, k, v, log_keep, lr))[0]
    torch.testing.assert_close(w1, scale * torch.softmax(logits, dim=-2), atol=1e-13, rtol=0)
    assert (w1 > 0).all()
    torch.testing.assert_close(w1.sum(-2), torch.full_like(w1.sum(-2), scale), atol=1e-13, rtol=0)


def test_memora_chunk_equals_softmax_recursion() -> None:
    """The chunk's linear recurrence on log-weights == applying the softmax after every token
    (softmax ignores the per-column shift that log W_{t-1} carries), gradients at W_0."""
    torch.manual_seed(6)
    core = linear_core(LpBias(2.0), KLRetention(1.0))
    st = core.init_state(1)
    k, v = token(n=5)
    log_keep, lr = gates(5)
    w0 = core.weights(st)[0]
    w = w0
    for n in range(5):
        e = torch.einsum("bhi,bhio->bho", k[:, :, n], w0) - v[:, :, n]
        logits = log_keep[..., n].exp()[..., None, None] * torch.log(w) - lr[..., n][..., None, None] * outer(
            k[:, :, n], 2 * e
        )
        w = torch.softmax(logits, dim=-2)
    with torch.no_grad():
        got = core.weights(core.update(st, k, v, log_keep, lr))[0]
    torch.testing.assert_close(got, w, atol=1e-13, rtol=0)


MODELS = ["moneta", "yaad", "memora"]


def build(name: str, **over) -> mixers.Mixer:
    torch.manual_seed(7)
    cfg = {**mixers.MIXERS.get(name).test_config, **over}
    return mixers.build(name, d_model=32, **cfg).double().eval()


@pytest.mark.parametrize("name", MODELS)
def test_chunk_update_equals_sequential_reference(name: str) -> None:
    """The model's own 2-layer MLP memory: closed-form chunk == token-by-token with autograd."""
    m = build(name)
    core = m.memory.core
    st = core.init_state(2)
    x = torch.randn(2, 6, 32, dtype=DT)
    with torch.no_grad():
        k, v, g, _ = m.memory.writes(x, m.memory.init_state(2, "cpu", DT)["mem.conv_kv"])
        extra = g[..., 2:] if g.shape[-1] > 2 else None
        fast = core.update(st, k, v, g[..., 0], g[..., 1], extra=extra)
        slow = reference_update(core, st, k, v, g[..., 0], g[..., 1], extra=extra)
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], atol=1e-11, rtol=0)
        assert (fast[n] - st[n]).abs().max() > 1e-4


@pytest.mark.parametrize(("name", "step"), [("moneta", 0.03), ("yaad", 0.3), ("memora", 80.0)])
def test_memory_learns_at_test_time(name: str, step: float) -> None:
    """Writing pairs makes M(k_i) closer to v_i: the model's attentional-bias loss drops.

    16 pairs, written 4 times over in chunks of 4 (test-time training, keep gate 1). Memora's step
    is larger because it moves log-weights, not weights (80: 10 on the summed bias, times the head
    dim 8 that the value-averaged bias divides its gradient by).
    """
    core = build(name).memory.core
    torch.manual_seed(8)
    k = torch.nn.functional.normalize(torch.randn(1, 4, 16, 8, dtype=DT), dim=-1)
    v = 0.3 * torch.randn(1, 4, 16, 8, dtype=DT)
    zero = torch.zeros(1, 4, 4, dtype=DT)
    extra = torch.full((1, 4, 4, 1), 2.0, dtype=DT) if isinstance(core.bias, HuberBias) else None
    ex16 = None if extra is None else extra.repeat(1, 1, 4, 1)
    st = core.init_state(1)
    with torch.no_grad():
        before = core.loss(core.weights(st), k, v, ex16)
        for c in range(16):
            sl = slice(4 * (c % 4), 4 * (c % 4) + 4)
            st = core.update(st, k[:, :, sl], v[:, :, sl], zero, zero + step, extra=extra)
        after = core.loss(core.weights(st), k, v, ex16)
    assert after.mean() < 0.85 * before.mean(), (before.mean(), after.mean())
    assert (after < before).double().mean() > 0.75


def test_memora_memory_stays_on_the_simplex_through_a_sequence() -> None:
    m = build("memora", simplex_scale=3.0)
    with torch.no_grad():
        _, st = m(torch.randn(2, 19, 32, dtype=DT))
    for w in m.memory.core.weights(st):
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-2), torch.full_like(w.sum(-2), 3.0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_memory_carries_information_across_chunks(name: str) -> None:
    """Without attention, token 1 reaches later chunks (beyond the conv) only via the memory."""
    m = build(name, conv_size=1)
    x = torch.randn(2, 12, 32, dtype=DT)
    x2 = x.clone()
    x2[:, 1] += 1.0
    with torch.no_grad():
        d = (m(x2)[0] - m(x)[0]).abs().amax(dim=(0, 2))
    assert d[2:4].max() < 1e-12  # same chunk, later tokens: they read the chunk-start memory
    assert d[4:].min() > 1e-8


@pytest.mark.parametrize(
    ("name", "over", "match"),
    [
        ("moneta", {"p": 0.5}, "p must be >= 1, got 0.5"),
        ("moneta", {"q": 1.0}, "q must be > 1, got 1.0"),
        ("memora", {"simplex_scale": 0.0}, "simplex_scale must be > 0, got 0.0"),
        ("yaad", {"chunk_size": 0}, "chunk_size must be a positive int, got 0"),
        ("memora", {"n_heads": 3}, "n_heads=3 must divide d_model=32"),
        ("yaad", {"mem_expansion": 0}, "mem_expansion must be a positive int, got 0"),
    ],
)
def test_config_errors_name_the_value(name: str, over: dict, match: str) -> None:
    cfg = {**mixers.MIXERS.get(name).test_config, **over}
    with pytest.raises(ValueError, match=match):
        mixers.build(name, d_model=32, **cfg)
