"""ALISA's decoding steps: no device reads in a steady step, few ops, and the same tokens and host
tier as the straightforward algorithm (every eviction appended to the tier, which is trimmed
to its cap right away; every ``refresh`` steps the whole tier merged back into the device)."""

from __future__ import annotations

import warnings

import pytest
import torch
from kvtiny import random_ids, tiny_model
from test_decode_overhead import SYNC_OPS, decode_step_ops
from torch.utils._python_dispatch import TorchDispatchMode

from memlab.kvcache import KVCache, policies, run_prompt
from memlab.kvcache.generate import decode_step
from memlab.kvcache.policies.alisa import ALISA, HostTier, host_nbytes


# --- the reference: per-step concatenation and trim, on Python lists -----------------------------
def _best(rows: list[tuple], cap: int) -> list[tuple]:
    """The ``cap`` highest scores (row[0]) in their order; ties go to the earlier row."""
    keep = sorted(range(len(rows)), key=lambda i: (-rows[i][0], i))[:cap]
    return [rows[i] for i in sorted(keep)]


class ReferenceALISA(ALISA):
    """ALISA's host tier as a list of (score, position, key, value) per (layer, group, batch, head)."""

    def after_layer(self, cache: KVCache, layer: int, phase: str) -> None:
        pass

    def on_evict(self, cache, layer, group, g, evicted, scores, kept_host=None) -> None:
        tiers = cache.state.setdefault("ref_host", {})
        b, _, h = evicted.shape
        tier = tiers.setdefault((layer, group), [[[] for _ in range(h)] for _ in range(b)])
        n_ev = evicted.sum(dim=1)
        cap = self.host_tokens if self.host_tokens is not None else int((g.lengths - n_ev).max())
        for bi in range(b):
            for hi in range(h):
                for row in evicted[bi, :, hi].nonzero().flatten().tolist():
                    tier[bi][hi].append((float(scores[bi, row, hi].float()), int(g.positions[bi, row, hi]),
                                         g.keys[bi, row, hi].clone(), g.values[bi, row, hi].clone()))
                tier[bi][hi] = _best(tier[bi][hi], cap)

    def refill(self, cache, layer, group) -> None:
        tier = cache.state.get("ref_host", {}).get((layer.layer_idx, group))
        if tier is None or not any(rows for per_b in tier for rows in per_b):
            return
        if int(cache.seen.max() - cache.frozen_seen.max()) % self.refresh:
            return
        g = layer.groups[group]
        b, _, h, d = g.keys.shape
        merged = [[None] * h for _ in range(b)]
        for bi in range(b):
            for hi in range(h):
                n = int(g.lengths[bi, hi])
                rows = [(int(g.positions[bi, r, hi]), g.keys[bi, r, hi], g.values[bi, r, hi])
                        for r in range(n)]
                rows += [(p, k, v) for _, p, k, v in tier[bi][hi]]
                merged[bi][hi] = sorted(rows, key=lambda row: row[0])
        s = max(len(rows) for per_b in merged for rows in per_b)
        keys, values = g.keys.new_zeros(b, s, h, d), g.values.new_zeros(b, s, h, d)
        positions = g.positions.new_zeros(b, s, h)
        for bi in range(b):
            for hi in range(h):
                for r, (p, k, v) in enumerate(merged[bi][hi]):
                    positions[bi, r, hi], keys[bi, r, hi], values[bi, r, hi] = p, k, v
        counts = [[len(merged[bi][hi]) for hi in range(h)] for bi in range(b)]
        lengths = torch.tensor(counts, device=g.keys.device)  # on the cache's device (CUDA test)
        g.keys, g.values, g.positions, g.lengths = keys, values, positions, lengths
        del cache.state["ref_host"][(layer.layer_idx, group)]


def _decode(model, policy, ids, mask=None, steps=20, chunk=None, question=None):
    cache = KVCache(model.config, policy=policy)
    tokens = []
    with torch.no_grad():
        logits = run_prompt(model, ids, cache, attention_mask=mask, chunk=chunk, question_ids=question)
        for _ in range(steps):
            tokens.append(logits.argmax(dim=-1))
            logits = decode_step(model, cache, tokens[-1])
    return torch.stack(tokens, dim=1), cache


def _device_rows(cache: KVCache) -> dict:
    out = {}
    for lay in cache.layers:
        for gi, g in enumerate(lay.groups):
            b, h = g.lengths.shape
            kept = g.lengths.tolist()
            rows = [[g.positions[bi, : kept[bi][hi], hi].tolist() for hi in range(h)] for bi in range(b)]
            out[(lay.layer_idx, gi)] = rows
    return out


def _host_rows(cache: KVCache) -> dict:
    out = {}
    for key, tier in cache.state.get("alisa_host", {}).items():
        pos, lengths = tier["positions"], tier["lengths"]
        out[key] = [[pos[b, : int(lengths[b, h]), h].tolist() for h in range(lengths.shape[1])]
                    for b in range(lengths.shape[0])]
    return out


def _reference_host_rows(cache: KVCache) -> dict:
    return {key: [[[p for _, p, _, _ in rows] for rows in per_b] for per_b in tier]
            for key, tier in cache.state.get("ref_host", {}).items()}


@pytest.mark.parametrize(
    ("cfg", "padded", "chunk", "question"),
    [
        ({"ratio": 0.25, "refresh": 4}, False, None, False),
        ({"ratio": 0.25, "refresh": 1}, False, None, False),
        ({"ratio": 0.25, "refresh": 5, "host_tokens": 6}, False, None, False),  # phase III below the budget
        ({"ratio": 0.25, "refresh": 4}, False, None, True),  # a 16-token question: step 16 refills
        ({"tokens": 56, "refresh": 5, "host_tokens": 60}, False, None, True),  # the tier's buffer grows
        ({"ratio": 0.25, "refresh": 4}, True, None, False),  # unequal lengths over the batch
        ({"ratio": 0.25, "refresh": 4}, False, 16, False),  # chunked prefill: the cap grows
    ],
)
def test_decoding_matches_the_per_step_reference(
    cfg: dict, padded: bool, chunk: int | None, question: bool
) -> None:
    model = tiny_model(layers=2)
    ids = random_ids(2, 64)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :13] = 0
    q = random_ids(2, 16, seed=5) if question else None
    got, cache = _decode(model, policies.build("alisa", history=4, **cfg), ids, mask, chunk=chunk, question=q)
    want, ref = _decode(model, ReferenceALISA(history=4, **cfg), ids, mask, chunk=chunk, question=q)
    assert torch.equal(got, want)
    assert _device_rows(cache) == _device_rows(ref)
    assert _host_rows(cache) == _reference_host_rows(ref)
    assert host_nbytes(cache) > 0


def test_trimming_the_union_once_keeps_what_per_step_trims_keep() -> None:
    # Tied scores (small integers) and a cap that shrinks, then grows: the lazy tier must keep
    # the rows (and their order) that a trim after every eviction keeps.
    g = torch.Generator().manual_seed(3)
    b, h, d = 2, 3, 4
    tier = HostTier(slack=4, device=torch.device("cpu"), pin=False)
    ref = [[[] for _ in range(h)] for _ in range(b)]
    caps = [6, 6, 5, 5, 5, 8, 8, 3, 7, 7, 7, 7]
    for step, cap in enumerate(caps):
        n = int(torch.randint(1, 5, (), generator=g))
        scores = torch.randint(0, 3, (n, b, h), generator=g).float()
        valid = torch.rand(n, b, h, generator=g) < 0.8 if step % 3 == 2 else None
        positions = 100 * step + torch.arange(n)[:, None, None].expand(n, b, h)
        keys = torch.randn(n, b, h, d, generator=g)
        tier.append({"keys": keys, "values": -keys, "positions": positions, "scores": scores}, valid, cap)
        for bi in range(b):
            for hi in range(h):
                rows = [(float(scores[r, bi, hi]), int(positions[r, bi, hi])) for r in range(n)
                        if valid is None or bool(valid[r, bi, hi])]
                ref[bi][hi] = _best(ref[bi][hi] + rows, cap)
        if step % 4 == 3:  # reads (which trim in place) between evictions change nothing
            tier.compact()
    lengths, pos, keys, values = tier["lengths"], tier["positions"], tier["keys"], tier["values"]
    for bi in range(b):
        for hi in range(h):
            n = int(lengths[bi, hi])
            assert pos[bi, :n, hi].tolist() == [p for _, p in ref[bi][hi]]
            assert torch.equal(values[bi, :n, hi], -keys[bi, :n, hi])


@pytest.mark.parametrize(
    "cfg",
    [
        {"ratio": 0.5, "history": 4},  # a plain step: evicted rows appended to the host tier
        {"ratio": 0.5, "history": 4, "refresh": 3},  # the counted step (the 3rd) refills
        {"ratio": 0.5, "history": 4, "refresh": 1, "host_tokens": 5},  # refill and phase III
    ],
)
def test_steady_alisa_step_never_syncs(monkeypatch: pytest.MonkeyPatch, cfg: dict) -> None:
    ops, _ = decode_step_ops(monkeypatch, "alisa", **cfg)
    assert sum(ops[op] for op in SYNC_OPS) == 0, dict(ops)


def test_steady_alisa_step_dispatches_few_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    # Per layer (measured 135): the full cache's 15 (storing the token), ALISA's scores of the
    # rows by the last 4 queries (54: window probabilities, importance, the local window),
    # choosing and keeping the rows (37: select_rows' sorts, the evicted mask), remembering the
    # queries (7) and the host tier's 22 (evicted rows sorted first, gathered in row-major
    # blocks, 4 copies into the tier). A refresh step adds the merge (31: 4 copies back, 3
    # concatenations and gathers, a sort by position). The per-step concatenation and trim of
    # the whole tier took 201 per layer, 7 of them device reads.
    plain, n_layers = decode_step_ops(monkeypatch, "alisa", ratio=0.5, history=4)
    refill, _ = decode_step_ops(monkeypatch, "alisa", ratio=0.5, history=4, refresh=3)
    assert sum(plain.values()) / n_layers <= 140, dict(plain)
    assert sum(refill.values()) / n_layers <= 140 + 35, dict(refill)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_host_tier_work_per_step_does_not_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    # The host tier's ops per step (moving the evicted rows, and every ``refresh`` steps bringing
    # the tier back) are the same at every steady step, however many rows the tier has seen.
    ops: dict[str, int] = {}

    def counted(name, fn):
        def wrapped(*args, **kwargs):
            with _Count() as c:
                out = fn(*args, **kwargs)
            ops[name] = ops.get(name, 0) + c.n
            return out
        return wrapped

    for name in ("on_evict", "refill"):
        monkeypatch.setattr(ALISA, name, counted(name, getattr(ALISA, name)))
    model = tiny_model(layers=2)
    cache = KVCache(model.config, policy=policies.build("alisa", ratio=0.25, history=4, refresh=4))
    per_step = []
    with torch.no_grad():
        logits = run_prompt(model, random_ids(2, 64), cache)
        for _ in range(14):
            ops.clear()
            logits = decode_step(model, cache, logits.argmax(dim=-1))
            per_step.append((ops.get("on_evict", 0), ops.get("refill", 0)))
    refresh_steps = [per_step[i] for i in range(3, 14, 4)]  # steps 4, 8, 12
    plain_steps = [per_step[i] for i in range(14) if (i + 1) % 4 and i >= 2]
    assert len(set(refresh_steps)) == 1 and len(set(plain_steps)) == 1, per_step
    assert plain_steps[0][0] <= 2 * 24 and plain_steps[0][1] == 0, per_step  # 2 layers
    assert refresh_steps[0][1] <= 2 * 35, per_step


def _sync_warnings(model, policy, ids, steps: int) -> int:
    """Device syncs CUDA reports in ``steps`` decoding steps after 3 first ones."""
    cache = KVCache(model.config, policy=policy)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        logits = run_prompt(model, ids, cache)
        for _ in range(3):
            logits = decode_step(model, cache, logits.argmax(dim=-1))
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                logits = decode_step(model, cache, logits.argmax(dim=-1))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_host_tier_matches_the_reference_and_adds_no_sync() -> None:
    model = tiny_model(layers=2).cuda()
    ids = random_ids(2, 64).cuda()
    cfg = {"ratio": 0.25, "refresh": 4, "host_tokens": 10}
    got, cache = _decode(model, policies.build("alisa", history=4, **cfg), ids)
    want, ref = _decode(model, ReferenceALISA(history=4, **cfg), ids)
    assert torch.equal(got, want)
    assert _device_rows(cache) == _device_rows(ref)
    assert _host_rows(cache) == _reference_host_rows(ref)
    tier = cache.state["alisa_host"][(0, 0)]
    assert tier["keys"].device.type == "cpu" and tier["keys"].is_pinned()
    # Steps 4 to 7, a refresh step among them: no more syncs than the full cache's (the model's).
    full = _sync_warnings(model, policies.build("full"), ids, 4)
    assert _sync_warnings(model, policies.build("alisa", history=4, **cfg), ids, 4) <= full
