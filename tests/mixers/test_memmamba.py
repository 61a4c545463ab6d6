"""MemMamba: the parallel pool scan against a token-by-token reference with the paper's priority
rule, summaries feeding later layers through cross-layer attention, the two thresholds, the pool
bound, and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from memlab import mixers
from memlab.mixers.memmamba import EMPTY, MemMamba

DT = torch.float64
D = 16


def make(seed: int = 0, **options) -> MemMamba:
    torch.manual_seed(seed)
    base = {"d_summary": 8, "n_heads": 2, "d_state": 4, "chunk_size": 4, "pool_size": 3}
    return mixers.build("memmamba", d_model=D, **{**base, **options}).double().eval()


def heads_attend(attn, query: torch.Tensor, notes: list[torch.Tensor]) -> torch.Tensor:
    """One token's multi-head attention over a list of notes; zero when the list is empty."""
    if not notes:
        return torch.zeros(D, dtype=DT)
    h, dh = attn.n_heads, attn.head_dim
    q = attn.q(query).view(h, dh)
    k = attn.k(torch.stack(notes)).view(len(notes), h, dh)
    v = attn.v(torch.stack(notes)).view(len(notes), h, dh)
    w = torch.softmax(torch.einsum("hd,khd->hk", q, k) / math.sqrt(dh), dim=-1)
    return attn.o(torch.einsum("hk,khd->hd", w, v).reshape(-1))


def reference(m: MemMamba, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The whole mixer with the note pools kept token by token, as the paper describes them:
    a window's best note is inserted when its importance exceeds tau_1; a full pool replaces its
    least important note when the new one is more important; a token reads the pool as it was at
    the start of its window. Mamba itself is the trusted ``mamba`` mixer."""
    c = m.config
    b, t, _ = x.shape
    s = c.summary_every
    u = x.clone()
    seen_by: list[list[list[list[torch.Tensor]]]] = []  # [layer][batch][token] -> visible notes
    pools = []
    for layer in m.layers:
        if layer.cross_attn is not None:
            q_in = layer.cross_norm(u)
            add = torch.zeros_like(u)
            for bi in range(b):
                for ti in range(t):
                    notes = [n for lay in seen_by for n in lay[bi][ti]]
                    add[bi, ti] = heads_attend(layer.cross_attn, q_in[bi, ti], notes)
            u = u + add
        h, _ = layer.mamba(layer.norm(u))
        imp = torch.sigmoid(layer.score_token(h))[..., 0]
        notes = imp[..., None] * layer.summarize(h)
        s_imp = torch.sigmoid(layer.score_state(h))[..., 0]
        visible = [[None] * t for _ in range(b)]
        retrieved = torch.zeros_like(u)
        layer_pools = []
        for bi in range(b):
            pool: list[tuple[float, torch.Tensor]] = []
            snapshot: list[torch.Tensor] = []
            best: tuple[float, torch.Tensor] | None = None
            for ti in range(t):
                if ti % s == 0:
                    snapshot = [n for _, n in pool]
                    best = None
                visible[bi][ti] = snapshot
                if best is None or imp[bi, ti].item() > best[0]:
                    best = (imp[bi, ti].item(), notes[bi, ti])
                if ti % s == s - 1 and best[0] > c.tau_token:
                    if len(pool) < c.pool_size:
                        pool.append(best)
                    else:
                        j = min(range(len(pool)), key=lambda i: pool[i][0])
                        if best[0] > pool[j][0]:
                            pool[j] = best
                if s_imp[bi, ti] > c.tau_state:
                    retrieved[bi, ti] = s_imp[bi, ti] * heads_attend(layer.token_attn, h[bi, ti], snapshot)
            layer_pools.append(sorted(p for p, _ in pool))
        pools.append(layer_pools)
        seen_by.append(visible)
        u = u + h + retrieved
    return u - x, pools


CONFIGS = [
    {"summary_every": 1, "select_chunk": 2, "n_layers": 1},
    {"summary_every": 1, "select_chunk": 5, "n_layers": 2},
    {"summary_every": 3, "select_chunk": 2, "n_layers": 2, "pool_size": 2},
    {"summary_every": 2, "select_chunk": 64, "n_layers": 3, "cross_layer_every": 2, "tau_token": 0.0},
]


@pytest.mark.parametrize("options", CONFIGS)
def test_parallel_scan_matches_token_by_token_reference(options: dict) -> None:
    m = make(**options)
    x = torch.randn(2, 20, D, dtype=DT)
    with torch.no_grad():
        y, state = m(x)
        ref, pools = reference(m, x)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
    # The pools hold the same notes (as a set: the order of pool slots carries no meaning).
    for layer_state, layer_ref in zip(state["layers"], pools, strict=True):
        for bi in range(2):
            got = sorted(v for v in layer_state["pool_score"][bi].tolist() if v != EMPTY)
            assert got == pytest.approx(layer_ref[bi], abs=1e-12)
    # The pools were really used: some notes written, and some token read one.
    assert any(len(p) > 0 for layer_ref in pools for p in layer_ref)


def test_chunked_calls_match_with_unaligned_windows() -> None:
    m = make(summary_every=3, select_chunk=2, n_layers=2)
    x = torch.randn(1, 31, D, dtype=DT)
    with torch.no_grad():
        full, _ = m(x)
        state, outs, i = None, [], 0
        for n in (2, 5, 1, 7, 3, 13):  # calls that start and end mid-window
            y, state = m(x[:, i : i + n], state=state)
            outs.append(y)
            i += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)


def prefix_state(m: MemMamba, t: int = 24):
    x = torch.randn(2, t, D, dtype=DT)
    with torch.no_grad():
        _, state = m(x)
    return state


def perturb_pool(state, layer: int):
    out = {"layers": [dict(s) for s in state["layers"]], "pos": state["pos"]}
    out["layers"][layer]["pool_note"] = state["layers"][layer]["pool_note"] + 1.0
    return out


def test_summaries_feed_later_layers_through_cross_layer_attention() -> None:
    m = make(n_layers=2, summary_every=1, tau_token=0.0)
    with torch.no_grad():
        # Layer 0 no longer reads its own pool, so only layer 1 can see layer 0's notes.
        m.layers[0].token_attn.o.weight.zero_()
        state = prefix_state(m)
        assert (state["layers"][0]["pool_score"] > 0).all(), "layer 0's pool should be full"
        x = torch.randn(2, 5, D, dtype=DT)
        y0, _ = m(x, state=state)
        y1, _ = m(x, state=perturb_pool(state, 0))
        assert (y1 - y0).abs().max() > 1e-6, "layer 0's notes did not reach layer 1"
        # Cut the cross-layer path: the same perturbation no longer changes anything.
        m.layers[1].cross_attn.o.weight.zero_()
        y0, _ = m(x, state=state)
        y1, _ = m(x, state=perturb_pool(state, 0))
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)


def test_later_pools_do_not_feed_earlier_layers() -> None:
    m = make(n_layers=2, summary_every=1, tau_token=0.0)
    with torch.no_grad():
        m.layers[1].token_attn.o.weight.zero_()  # layer 1's own reads off: its pool is write-only
        state = prefix_state(m)
        x = torch.randn(2, 5, D, dtype=DT)
        y0, _ = m(x, state=state)
        y1, _ = m(x, state=perturb_pool(state, 1))
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)


def test_pool_is_bounded_and_keeps_the_most_important_notes() -> None:
    m = make(n_layers=1, summary_every=1, tau_token=0.0, pool_size=4)
    with torch.no_grad():
        x = torch.randn(1, 200, D, dtype=DT)
        _, state = m(x)
        layer = m.layers[0]
        imp = torch.sigmoid(layer.score_token(layer.mamba(layer.norm(x))[0]))[0, :, 0]
    pool = state["layers"][0]["pool_score"][0]
    assert pool.shape == (4,) and state["layers"][0]["pool_note"].shape == (1, 4, 8)
    torch.testing.assert_close(pool.sort().values, imp.topk(4).values.sort().values, atol=1e-12, rtol=0)
    short = m(torch.randn(1, 3, D, dtype=DT))[1]
    assert mixers.state_nbytes(short) == mixers.state_nbytes(state)


def test_token_threshold_gates_writes() -> None:
    m = make(n_layers=1, tau_token=0.9)
    with torch.no_grad():
        m.layers[0].score_token.weight.zero_()
        m.layers[0].score_token.bias.fill_(-3.0)  # importance 0.047 < tau_1: nothing is written
        x = torch.randn(2, 30, D, dtype=DT)
        y0, state = m(x)
        assert (state["layers"][0]["pool_score"] == EMPTY).all()
        m.layers[0].token_attn.o.weight.normal_()  # reading an empty pool gives exactly zero
        y1, _ = m(x)
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)


def test_state_threshold_gates_reads() -> None:
    m = make(n_layers=1, tau_token=0.0, tau_state=0.5)
    with torch.no_grad():
        x = torch.randn(2, 30, D, dtype=DT)
        y_on, _ = m(x)
        m.layers[0].score_state.weight.zero_()
        m.layers[0].score_state.bias.fill_(-3.0)  # state importance 0.047 < tau_2: no reads
        y_off, _ = m(x)
        layer = m.layers[0]
        plain = layer.mamba(layer.norm(x))[0]  # u = x + h: the mixer returns h alone
    torch.testing.assert_close(y_off, plain, atol=1e-12, rtol=0)
    assert (y_on - y_off).abs().max() > 1e-6


def test_notes_outlive_the_mamba_decay() -> None:
    # Mamba made to forget within a few steps (dt ~ 10, decay <= e^-10 per step); the pool is large
    # enough to keep every note. Token 0 then reaches token 59 only through its note.
    m = make(n_layers=1, summary_every=1, tau_token=0.0, tau_state=0.0, pool_size=64)
    layer = m.layers[0]
    with torch.no_grad():
        layer.mamba.dt_proj.weight.zero_()
        layer.mamba.dt_proj.bias.fill_(10.0)
        x = torch.randn(1, 60, D, dtype=DT)
        x2 = x.clone()
        x2[:, 0] += 3.0
        with_notes = (m(x2)[0] - m(x)[0])[0, -1].abs().max()
        layer.token_attn.o.weight.zero_()
        without = (m(x2)[0] - m(x)[0])[0, -1].abs().max()
    assert without < 1e-12
    assert with_notes > 1e-6


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"pool_size": 0}, "pool_size"),
        ({"summary_every": 0}, "summary_every"),
        ({"select_chunk": 0}, "select_chunk"),
        ({"n_layers": 0}, "n_layers"),
        ({"d_summary": 10, "n_heads": 4}, "n_heads"),
        ({"tau_token": 1.5}, "tau_token"),
        ({"tau_state": -0.1}, "tau_state"),
        ({"n_layers": 2, "cross_layer_every": 2}, "cross_layer_every"),
        ({"d_state": 0}, "d_state"),
    ],
)
def test_config_errors(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        mixers.build("memmamba", d_model=16, **options)
