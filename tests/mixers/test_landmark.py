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


def raw_projections(m: mixers.Mixer, x: torch.Tensor) -> torch.Tensor:
    """Un-rotated q, k, v stacked: (3, B, H, T, D)."""
    b, t, _ = x.shape
    return m.qkv_proj(x).view(b, t, 3, m.n_heads, m.head_dim).permute(2, 0, 3, 1, 4)


def rot(vec: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate (n, D) vectors to positions (n,)."""
    return rotary(vec[None, None], positions)[0, 0]


def block_at(m: mixers.Mixer, k_raw: torch.Tensor, bi: int, h: int, c: int, slot: int):
    """Keys (bs, D) and landmark key (D,) of block c moved as a whole to block ``slot``: its tokens
    at positions slot * bs .., its landmark at the slot's last position (no shift tricks)."""
    bs, d = m.config.block_size, m.head_dim
    pos = torch.arange(slot * bs, (slot + 1) * bs)
    keys = rot(k_raw[bi, h, c * bs : (c + 1) * bs], pos)
    e = m.qkv_proj(m.landmark).view(3, m.n_heads, d)[:, h]
    q_l, k_l = rot(e[0][None], pos[-1:])[0], rot(e[1][None], pos[-1:])[0]
    a = torch.softmax(keys @ q_l / math.sqrt(d), 0)
    return keys, k_l + a @ keys


def paper_score_slot(b: int, c: int, k: int, mapping: str) -> int:
    """Where block c sits when a query of block b scores its landmark: the latest k blocks keep
    their place, older ones are scored from the prefix's first slot b - k - 1."""
    return max(c, b - k - 1) if mapping == "stingy" else c


def paper_retrieval_slots(b: int, chosen: list[int], k: int, mapping: str) -> dict[int, int]:
    """Where the retrieved blocks sit in the prefix (epfml/landmark-attention, mem_cache.py): the
    old ones (more than k blocks back) fill it from its first slot on, the recent ones end at the
    slot before the query's block, each group in its order."""
    if mapping == "exact":
        return {c: c for c in chosen}
    old = sorted(c for c in chosen if c < b - k)
    recent = sorted(c for c in chosen if c >= b - k)
    slots = {c: b - len(chosen) - 1 + j for j, c in enumerate(old)}
    slots.update({c: b - len(recent) + j for j, c in enumerate(recent)})
    return slots


def stingy_reference_scores(m: mixers.Mixer, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T // bs) landmark scores q_i . k_L(c) with block c at its stingy scoring slot."""
    b_, t, _ = x.shape
    bs, k = m.config.block_size, m.config.top_k
    q_raw, k_raw, _ = raw_projections(m, x)
    out = torch.zeros(b_, m.n_heads, t, t // bs, dtype=x.dtype)
    for bi in range(b_):
        for h in range(m.n_heads):
            for i in range(t):
                q_i = rot(q_raw[bi, h, i][None], torch.tensor([i]))[0]
                for c in range(i // bs):
                    slot = paper_score_slot(i // bs, c, k, "stingy")
                    out[bi, h, i, c] = q_i @ block_at(m, k_raw, bi, h, c, slot)[1]
    return out


def reference_topk(m: mixers.Mixer, x: torch.Tensor, mapping: str):
    """Top-k retrieval with the paper's position mapping, query by query and block by block.

    Returns the output, the retrieved blocks {(bi, h, i): set} and their slots {(bi, h, i): dict}.
    """
    b_, t, _ = x.shape
    bs, k, scale = m.config.block_size, m.config.top_k, 1.0 / math.sqrt(m.head_dim)
    reach = m.config.memory_blocks
    q_raw, k_raw, v = raw_projections(m, x)
    out = torch.zeros_like(q_raw)
    chosen_all, slots_all = {}, {}
    for bi in range(b_):
        for h in range(m.n_heads):
            for i in range(t):
                b = i // bs
                q_i = rot(q_raw[bi, h, i][None], torch.tensor([i]))[0]
                past = [c for c in range(b) if reach is None or c >= b - reach]
                score = {
                    c: q_i @ block_at(m, k_raw, bi, h, c, paper_score_slot(b, c, k, mapping))[1]
                    for c in past
                }
                chosen = sorted(past, key=lambda c: -score[c].item())[:k]
                slots = paper_retrieval_slots(b, chosen, k, mapping)
                chosen_all[bi, h, i], slots_all[bi, h, i] = set(chosen), slots
                own = list(range(b * bs, i + 1))
                k_own = rot(k_raw[bi, h, own], torch.tensor(own))
                logits, values = [k_own @ q_i * scale], [v[bi, h, own]]
                marks = []
                for c in chosen:
                    keys, lk = block_at(m, k_raw, bi, h, c, slots[c])
                    marks.append((lk @ q_i) * scale)
                    inner = torch.log_softmax(keys @ q_i * scale, 0)
                    logits.append(inner + marks[-1])
                    values.append(v[bi, h, c * bs : (c + 1) * bs])
                # grouped softmax: local tokens and landmarks share one normaliser
                z = torch.logsumexp(torch.cat([logits[0], torch.stack(marks)]) if marks else logits[0], 0)
                p = torch.exp(torch.cat(logits) - z)
                out[bi, h, i] = p @ torch.cat(values)
    y = m.o_proj(out.transpose(1, 2).reshape(b_, t, -1))
    return y, chosen_all, slots_all


def test_grouped_matches_paper_formulation() -> None:
    m = make()
    x = torch.randn(2, 14, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        torch.testing.assert_close(y, reference_grouped(m, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("mapping", ["exact", "stingy"])
def test_retrieved_blocks_have_highest_landmark_scores(mapping: str) -> None:
    m = make(mode="topk", top_k=2, position_mapping=mapping)
    t = 26
    x = torch.randn(2, t, D, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        got = m.last_retrieved  # (B, H, T, 2) absolute block ids, -1 where fewer blocks exist
        if mapping == "exact":
            q, k, _ = m.project(x, 0)
            scores = torch.einsum("bhtd,bhnd->bhtn", q, reference_landmark_keys(m, k))
        else:  # the paper scores blocks older than the latest top_k from the prefix's first slot
            scores = stingy_reference_scores(m, x)
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
    "cfg",
    [
        {"mode": "topk"},
        {"mode": "topk", "memory_blocks": 3},
        {"memory_blocks": 2},
        {"mode": "topk", "position_mapping": "stingy"},
        {"mode": "topk", "position_mapping": "stingy", "memory_blocks": 4},
        {"mode": "topk", "position_mapping": "stingy", "top_k": 1},
    ],
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
        ({"position_mapping": "relative"}, "position_mapping"),
    ],
)
def test_config_errors(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixers.build("landmark", d_model=D, **cfg)


# ---- stingy position mapping ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"position_mapping": "exact"},
        {"position_mapping": "stingy"},
        {"position_mapping": "stingy", "top_k": 3, "memory_blocks": 5},
        {"position_mapping": "stingy", "top_k": 1},
    ],
)
def test_topk_matches_paper_position_mapping(cfg: dict) -> None:
    """Output, retrieved blocks and their slots equal a block-by-block reference that rotates each
    retrieved block (tokens and landmark) to the slot the paper's rule gives it."""
    m = make(mode="topk", **cfg)
    x = torch.randn(2, 34, D, dtype=torch.float64)
    mapping = cfg["position_mapping"]
    with torch.no_grad():
        y, _ = m(x)
        ref, chosen, slots = reference_topk(m, x, mapping)
    got, mapped = m.last_retrieved, m.last_mapped
    moved = 0
    for (bi, h, i), blocks in chosen.items():
        have = {c: s for c, s in zip(got[bi, h, i].tolist(), mapped[bi, h, i].tolist(), strict=True)}
        have.pop(-1, None)
        assert set(have) == blocks, (bi, h, i)
        assert have == slots[bi, h, i], (bi, h, i)
        moved += sum(c != s for c, s in have.items())
    assert (moved > 0) == (mapping == "stingy")
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_stingy_bounds_the_relative_distance(top_k: int) -> None:
    """Stingy: no query sees a key or landmark further than (top_k + 2) * block_size - 1 positions
    back, whatever the length; exact: the reach grows with the length."""
    bound = (top_k + 2) * BS - 1
    reach = {}
    for mapping in ("exact", "stingy"):
        for t in (40, 160):
            m = make(mode="topk", top_k=top_k, position_mapping=mapping)
            with torch.no_grad():
                m(torch.randn(1, t, D, dtype=torch.float64))
            q_pos = torch.arange(t)[None, None, :, None]
            ok = m.last_retrieved >= 0
            # retrieved tokens: the farthest is the first of the block, at mapped * bs
            far = torch.where(ok, q_pos - m.last_mapped * BS, 0).max().item()
            # landmark scoring: every past block's landmark, at the last position of its slot
            for i in range(t):
                b = i // BS
                for c in range(b):
                    slot = paper_score_slot(b, c, top_k, mapping)
                    far = max(far, i - ((slot + 1) * BS - 1))
            reach[mapping, t] = far
    assert reach["stingy", 40] <= bound and reach["stingy", 160] <= bound
    assert reach["stingy", 160] == reach["stingy", 40]
    assert reach["exact", 160] > reach["exact", 40] > bound


def test_stingy_equals_exact_while_the_prefix_holds_every_block() -> None:
    """A query with at most top_k past blocks retrieves them all and sees true positions (so top_k
    covering every block gives the grouped softmax); from block top_k + 1 on a retrieved block can
    be packed into another slot. Without rope the mapping changes nothing."""
    k = 2
    x = torch.randn(2, 36, D, dtype=torch.float64)
    n_exact = (k + 1) * BS  # queries of blocks 0 .. k
    with torch.no_grad():
        y_ex, _ = make(mode="topk", top_k=k)(x)
        y_st, _ = make(mode="topk", top_k=k, position_mapping="stingy")(x)
        y_all, _ = make(mode="topk", top_k=8, position_mapping="stingy")(x)
        y_grp, _ = make(mode="grouped", position_mapping="stingy")(x)
    torch.testing.assert_close(y_st[:, :n_exact], y_ex[:, :n_exact], atol=1e-12, rtol=0)
    assert (y_st[:, n_exact:] - y_ex[:, n_exact:]).abs().max() > 1e-6
    torch.testing.assert_close(y_all, y_grp, atol=1e-12, rtol=0)
    with torch.no_grad():
        y_norope, _ = make(mode="topk", top_k=k, rope=False, position_mapping="stingy")(x)
        y_norope_ex, _ = make(mode="topk", top_k=k, rope=False)(x)
    torch.testing.assert_close(y_norope, y_norope_ex, atol=0, rtol=0)


@pytest.mark.parametrize("cfg", [{}, {"memory_blocks": 3}])
def test_stingy_invariance_contract(cfg: dict) -> None:
    """The shared mixer contract (tests/mixers/test_invariance.py) for stingy top-k, whose shared
    test_config runs the grouped mode: full == chunked == decode, explicit init state, causality."""
    torch.manual_seed(0)
    m = mixers.build(
        "landmark", d_model=32, n_heads=2, block_size=4, top_k=2, mode="topk",
        position_mapping="stingy", **cfg,
    ).double().eval()
    torch.manual_seed(1)
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        torch.testing.assert_close(run_chunks(m, x, [5, 1, 9, 8, 6]), full, atol=1e-8, rtol=0)
        torch.testing.assert_close(run_chunks(m, x, [1] * 29), full, atol=1e-8, rtol=0)
        torch.testing.assert_close(m(x, state=m.init_state(2, x.device, x.dtype))[0], full, atol=1e-8, rtol=0)
        for t in (0, 7, 28):
            x2 = x.clone()
            x2[:, t] += torch.randn(2, 32, dtype=torch.float64)
            y1, _ = m(x2)
            torch.testing.assert_close(y1[:, :t], full[:, :t], atol=1e-8, rtol=0)
            assert (y1[:, t:] - full[:, t:]).abs().max() > 1e-9
