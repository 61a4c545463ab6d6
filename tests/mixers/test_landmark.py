"""Landmark attention: the grouped softmax as the paper writes it, top-k retrieval, the read counter."""

from __future__ import annotations

import math

import pytest
import torch

from memlab import mixers
from memlab.mixers.landmark import select_top_blocks
from memlab.mixers.rope import rotary

D = 16
BS = 4


def make(seed: int = 0, **cfg) -> mixers.Mixer:
    torch.manual_seed(seed)
    opts = {"n_heads": 2, "block_size": BS, "top_k": 2, **cfg}
    return mixers.build("landmark", d_model=D, **opts).double().eval()


def run_chunks(m: mixers.Mixer, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, outs, i = None, [], 0
    for n in sizes:
        y, state = m(x[:, i : i + n], state=state)
        outs.append(y)
        i += n
    return torch.cat(outs, dim=1)


def reference_landmark_keys(m: mixers.Mixer, k: torch.Tensor) -> torch.Tensor:
    """k: (B, H, T, D) rotated keys -> (B, H, T // bs, D), one block at a time."""
    h, d, bs = m.n_heads, m.head_dim, m.config.block_size
    e = m.qkv_proj(m.landmark).view(3, h, d)
    keys = []
    for c in range(k.shape[2] // bs):
        last = torch.tensor([(c + 1) * bs - 1])
        q_l = rotary(e[0][None, :, None, :], last)[0, :, 0]  # (H, D)
        k_l = rotary(e[1][None, :, None, :], last)[0, :, 0]
        block = k[:, :, c * bs : (c + 1) * bs]  # (B, H, bs, D)
        a = torch.softmax((block * q_l[None, :, None, :]).sum(-1) / math.sqrt(d), dim=-1)
        keys.append(k_l + (a[..., None] * block).sum(2))
    return torch.stack(keys, dim=2)


def reference_grouped(
    m: mixers.Mixer, x: torch.Tensor, retrieved: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's grouped softmax, group by group, for every (batch, head, query).

    Group of query i: the tokens of its block up to i and the landmarks of the past blocks (its own
    block's landmark is ignored); each past block's tokens form their own group. A past token's
    weight is its in-group probability times its landmark's probability; landmarks get weight 0.
    ``retrieved``: optional (B, H, T, k) block ids; then only those past blocks take part.
    """
    b, t, _ = x.shape
    bs, scale = m.config.block_size, 1.0 / math.sqrt(m.head_dim)
    q, k, v = m.project(x, 0)
    lk = reference_landmark_keys(m, k)
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(m.n_heads):
            for i in range(t):
                cur = i // bs
                past = list(range(cur))
                if retrieved is not None:
                    past = [c for c in past if c in retrieved[bi, h, i].tolist()]
                own = range(cur * bs, i + 1)
                local = [(q[bi, h, i] @ k[bi, h, j]) * scale for j in own]
                marks = [(q[bi, h, i] @ lk[bi, h, c]) * scale for c in past]
                z = sum(torch.exp(s) for s in local + marks)
                o = sum(torch.exp(s) / z * v[bi, h, j] for s, j in zip(local, own, strict=True))
                for c, mark in zip(past, marks, strict=True):
                    js = range(c * bs, (c + 1) * bs)
                    inner = torch.stack([(q[bi, h, i] @ k[bi, h, j]) * scale for j in js])
                    inner = torch.softmax(inner, 0)
                    o = o + torch.exp(mark) / z * sum(p * v[bi, h, j] for p, j in zip(inner, js, strict=True))
                out[bi, h, i] = o
    return m.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_grouped_matches_paper_formulation() -> None:
    m = make()
    x = torch.randn(2, 14, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        torch.testing.assert_close(y, reference_grouped(m, x), atol=1e-10, rtol=0)


def test_retrieved_blocks_have_highest_landmark_scores() -> None:
    m = make(mode="topk", top_k=2)
    t = 26
    x = torch.randn(2, t, D, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        got = m.last_retrieved  # (B, H, T, 2) absolute block ids, -1 where fewer blocks exist
        q, k, _ = m.project(x, 0)
        scores = torch.einsum("bhtd,bhnd->bhtn", q, reference_landmark_keys(m, k))
    for bi in range(2):
        for h in range(m.n_heads):
            for i in range(t):
                past = i // BS
                ranked = sorted(range(past), key=lambda c: -scores[bi, h, i, c].item())
                expect = set(ranked[:2])
                have = {c for c in got[bi, h, i].tolist() if c >= 0}
                assert have == expect, (bi, h, i)
                if past >= 2:  # the two kept are strictly above every block left out
                    low = min(scores[bi, h, i, c] for c in expect)
                    assert all(scores[bi, h, i, c] < low for c in ranked[2:])


def test_topk_matches_grouped_softmax_over_retrieved_blocks() -> None:
    m = make(mode="topk", top_k=2)
    x = torch.randn(1, 21, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        ref = reference_grouped(m, x, retrieved=m.last_retrieved)
        dense = make(mode="grouped", top_k=2)
        assert (y - dense(x)[0]).abs().max() > 1e-6  # retrieval does change the output
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)


def test_topk_with_k_covering_all_blocks_equals_grouped() -> None:
    x = torch.randn(2, 23, D, dtype=torch.float64)
    with torch.no_grad():
        y_top, _ = make(mode="topk", top_k=6)(x)
        y_grp, _ = make(mode="grouped")(x)
    torch.testing.assert_close(y_top, y_grp, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "cfg", [{"mode": "topk"}, {"mode": "topk", "memory_blocks": 3}, {"memory_blocks": 2}]
)
def test_forward_equals_chunked_and_decode(cfg: dict) -> None:
    m = make(**cfg)
    x = torch.randn(2, 31, D, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        torch.testing.assert_close(run_chunks(m, x, [5, 1, 9, 8, 8]), full, atol=1e-10, rtol=0)
        torch.testing.assert_close(run_chunks(m, x, [1] * 31), full, atol=1e-10, rtol=0)


def test_decode_reads_only_retrieved_blocks() -> None:
    """A decoding step reads n landmark keys, top_k * block_size retrieved tokens, its own block."""
    m = make(mode="topk", top_k=2)
    x = torch.randn(3, 30, D, dtype=torch.float64)
    with torch.no_grad():
        _, state = m(x[:, :29])
        m.reset_stats()
        m(x[:, 29:], state=state)
    bh = 3 * m.n_heads
    assert m.stats["queries"] == bh
    assert m.stats["landmarks_scanned"] == bh * 7  # position 29 is in block 7: blocks 0..6 are past
    assert m.stats["retrieved_tokens"] == bh * 2 * BS
    assert m.stats["local_tokens"] == bh * 2  # positions 28 and 29
    dense = make(mode="grouped")
    with torch.no_grad():
        _, state = dense(x[:, :29])
        dense.reset_stats()
        dense(x[:, 29:], state=state)
    assert dense.stats["retrieved_tokens"] == bh * 7 * BS


def test_memory_blocks_bound_the_state_and_the_reach() -> None:
    m = make(memory_blocks=2)
    with torch.no_grad():
        _, s40 = m(torch.randn(1, 40, D, dtype=torch.float64))
        _, s120 = m(torch.randn(1, 120, D, dtype=torch.float64))
    assert mixers.state_nbytes(s40) == mixers.state_nbytes(s120)
    assert s120["start"] == 112 and s120["k"].shape[2] == 8 and s120["lk"].shape[2] == 2
    x = torch.randn(1, 24, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 3] += 1.0  # block 0: out of reach (more than 2 blocks back) from block 3 on
    with torch.no_grad():
        y, y2 = m(x)[0], m(x2)[0]
    assert (y2[:, 4:12] - y[:, 4:12]).abs().max() > 1e-6
    torch.testing.assert_close(y2[:, 12:], y[:, 12:], atol=1e-12, rtol=0)


def test_select_top_blocks_rejects_k_above_blocks() -> None:
    scores = torch.randn(2, 5)
    with pytest.raises(ValueError, match="top_k=6"):
        select_top_blocks(scores, torch.ones(5, dtype=torch.bool), 6)
    idx, ok = select_top_blocks(scores, torch.tensor([True, False, True, False, False]), 3)
    assert ok.sum(-1).tolist() == [2, 2]
    assert all(set(idx[r][ok[r]].tolist()) == {0, 2} for r in range(2))


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"block_size": 0}, "block_size"),
        ({"top_k": 0}, "top_k"),
        ({"n_heads": 3}, "n_heads"),
        ({"mode": "sparse"}, "mode"),
        ({"top_k": 5, "memory_blocks": 4}, "top_k=5"),
        ({"memory_blocks": 0}, "memory_blocks"),
    ],
)
def test_config_errors(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixers.build("landmark", d_model=D, **cfg)
