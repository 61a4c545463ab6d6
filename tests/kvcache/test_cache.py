"""KVCache contract on tiny random Llama and Qwen2 models (float64, CPU)."""

from __future__ import annotations

import pytest
import torch
from kvtiny import masked_logits, random_ids, tiny_model
from transformers import DynamicCache

from memlab.kvcache import ATTN_NAME, KVCache, generate, greedy, policies, prefill


def hf_greedy(model, ids, n, mask=None):
    model.config._attn_implementation = "sdpa"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def kv_bytes(model, tokens: int, batch: int = 1) -> int:
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * batch * tokens * c.num_key_value_heads * d * 8  # float64


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_full_equals_transformers_cache(kind: str) -> None:
    model = tiny_model(kind)
    ids = random_ids(2, 37)
    ref = hf_greedy(model, ids, 12)
    # Through transformers' own generate loop...
    cache = KVCache(model.config, policy=policies.build("full"))
    assert model.config._attn_implementation == ATTN_NAME
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert torch.equal(out[:, 37:], ref)
    assert cache.nbytes() == kv_bytes(model, 37 + 11, batch=2) == cache.full_nbytes()
    # ... and through memlab's chunked prefill and greedy loop.
    for chunk in (None, 5):
        toks = generate(model, ids, KVCache(model.config), max_new_tokens=12, chunk=chunk)
        assert torch.equal(toks, ref)


def test_chunked_prefill_logits_equal_one_shot() -> None:
    model = tiny_model("llama")
    ids = random_ids(1, 41)
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        ref = model(ids, past_key_values=DynamicCache()).logits[:, -1]
    for chunk in (1, 4, 41):
        got = prefill(model, ids, KVCache(model.config), chunk=chunk)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_fallback_without_kvcache_is_plain_attention() -> None:
    model = tiny_model("qwen2")
    ids = random_ids(2, 19)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        ref = model(ids, attention_mask=mask).logits
        KVCache(model.config)  # switches the model to memlab_kv
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(got[1, 5:], ref[1, 5:], atol=1e-10, rtol=0)


BUDGETED = [
    ("streaming", {"sinks": 4}),
    ("h2o", {}),
    ("snapkv", {"window": 8}),
    ("pyramidkv", {"window": 8}),
]


@pytest.mark.parametrize("name,cfg", BUDGETED)
@pytest.mark.parametrize("budget", [{"tokens": 20}, {"ratio": 0.5}])
def test_policy_keeps_exactly_its_budget(name: str, cfg: dict, budget: dict) -> None:
    model = tiny_model("llama", layers=3)
    t = 48
    ids = random_ids(1, t)
    policy = policies.build(name, **budget, **cfg)
    cache = KVCache(model.config, policy=policy)
    prefill(model, ids, cache, chunk=16)
    per_layer = 20 if "tokens" in budget else t // 2
    kept = cache.kept_tokens()  # (L, B, Hkv)
    assert cache.nbytes() == kv_bytes(model, per_layer) * 1
    assert int(kept.sum()) == 3 * per_layer * 2
    if name == "pyramidkv":
        # Same total, but lower layers hold more than upper ones.
        assert kept[0, 0, 0] > kept[1, 0, 0] > kept[2, 0, 0]
    else:
        assert (kept == per_layer).all()
    # Decoding: policies that evict while decoding hold their budget; the others grow.
    generate(model, random_ids(1, 1, seed=5), cache, max_new_tokens=10)
    grown = 0 if policy.compress_decoding else 10
    assert cache.nbytes() == kv_bytes(model, per_layer + grown)


def test_streaming_keeps_sinks_and_window() -> None:
    model = tiny_model("llama")
    cache = KVCache(model.config, policy=policies.build("streaming", tokens=12, sinks=4))
    prefill(model, random_ids(1, 40), cache, chunk=9)
    for step in range(6):
        seen = int(cache.seen[0])
        want = set(range(4)) | set(range(seen - 8, seen))
        for layer in cache.layers:
            g = layer.groups[0]
            for h in range(g.positions.shape[2]):
                assert set(g.positions[0, : int(g.lengths[0, h]), h].tolist()) == want
        prefill(model, random_ids(1, 1, seed=10 + step), cache)


def streaming_reference_logits(
    model, ids: torch.Tensor, n_prompt: int, sinks: int, window: int
) -> torch.Tensor:
    """Full-model logits where query i >= n_prompt sees only the sinks and its last ``window``
    tokens (itself included): what a streaming cache must compute if positions are right."""
    t = ids.shape[1]
    allowed = torch.ones(t, t).tril().bool()
    for i in range(n_prompt, t):
        row = torch.zeros(t, dtype=torch.bool)
        row[:sinks] = True
        row[i - window + 1 : i + 1] = True
        allowed[i] = row
    return masked_logits(model, ids, allowed)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_positions_right_after_eviction(kind: str) -> None:
    """Decoding over an evicted cache equals the full model masked to the kept tokens: new tokens
    are rotated at positions that continue the count seen, not the compressed length."""
    model = tiny_model(kind)
    n_prompt, n_new, sinks, budget = 30, 8, 3, 10
    ids = random_ids(1, n_prompt + n_new)
    cache = KVCache(model.config, policy=policies.build("streaming", tokens=budget, sinks=sinks))
    got = [prefill(model, ids[:, :n_prompt], cache)]
    for i in range(n_prompt, n_prompt + n_new - 1):
        got.append(prefill(model, ids[:, i : i + 1], cache))
    # The cache holds `budget` rows before each new token arrives: sinks + (budget - sinks) recent,
    # and the new token joins them, so the query sees sinks + its last budget - sinks + 1 tokens.
    ref = streaming_reference_logits(model, ids, n_prompt, sinks, budget - sinks + 1)
    torch.testing.assert_close(got[0][0], ref[n_prompt - 1], atol=1e-9, rtol=0)
    for j, logits in enumerate(got[1:]):
        torch.testing.assert_close(logits[0], ref[n_prompt + j], atol=1e-9, rtol=0)
    assert int(cache.seen[0]) == n_prompt + n_new - 1 and cache.get_seq_length() == n_prompt + n_new - 1


def test_stored_keys_are_the_full_cache_keys_at_their_positions() -> None:
    """Every kept row (per layer and KV head) equals the full cache's key and value at the row's
    original position: eviction never re-rotates or shifts anything. (With one-shot prefill every
    layer sees the whole prompt; with chunks only layer 0's inputs stay those of the full model.)"""
    model = tiny_model("qwen2", layers=2)
    ids = random_ids(1, 50)
    model.config._attn_implementation = "sdpa"
    full = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=full)
    for chunk, layers in ((None, 2), (20, 1)):
        cache = KVCache(model.config, policy=policies.build("snapkv", tokens=16, window=4))
        prefill(model, ids, cache, chunk=chunk)
        for li in range(layers):
            fk, fv = full.layers[li].keys, full.layers[li].values  # (B, Hkv, T, D)
            g = cache.layers[li].groups[0]
            for h in range(g.keys.shape[2]):
                pos = g.positions[0, :, h]
                torch.testing.assert_close(g.keys[0, :, h], fk[0, h, pos], atol=1e-12, rtol=0)
                torch.testing.assert_close(g.values[0, :, h], fv[0, h, pos], atol=1e-12, rtol=0)
                assert set(range(46, 50)) <= set(pos.tolist())  # the observation window stays


@pytest.mark.parametrize("name,cfg", [("full", {}), ("snapkv", {"ratio": 0.5, "window": 4}),
                                      ("streaming", {"ratio": 0.5}), ("h2o", {"ratio": 0.5})])
def test_padded_batch_equals_each_sample_alone(name: str, cfg: dict) -> None:
    model = tiny_model("llama")
    a, b = random_ids(1, 33, seed=3), random_ids(1, 21, seed=4)
    ids = torch.zeros(2, 33, dtype=torch.long)
    mask = torch.zeros(2, 33, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 12:], mask[1, 12:] = b[0], 1
    batch = generate(model, ids, KVCache(model.config, policy=policies.build(name, **cfg)),
                     attention_mask=mask, max_new_tokens=8, chunk=10)
    alone_a = generate(model, a, KVCache(model.config, policy=policies.build(name, **cfg)), max_new_tokens=8,
                       chunk=10)
    alone_b = generate(model, b, KVCache(model.config, policy=policies.build(name, **cfg)), max_new_tokens=8,
                       chunk=10)
    assert torch.equal(batch[0], alone_a[0]) and torch.equal(batch[1], alone_b[0])
    if name == "full":
        ref = hf_greedy(model, ids, 8, mask)
        assert torch.equal(batch, ref)


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_gqa_memory_scales_with_kv_heads(kv_heads: int) -> None:
    model = tiny_model("llama", heads=8, kv_heads=kv_heads)
    cache = KVCache(model.config, policy=policies.build("snapkv", tokens=12, window=4))
    prefill(model, random_ids(1, 40), cache)
    d = model.config.hidden_size // 8
    assert cache.nbytes() == 2 * 2 * 12 * kv_heads * d * 8
    assert cache.kept_tokens().shape == (2, 1, kv_heads)


def test_query_agnostic_compresses_context_before_question() -> None:
    model = tiny_model("llama")
    ctx, question = random_ids(1, 40), random_ids(1, 6, seed=9)
    agnostic = KVCache(model.config, policy=policies.build("snapkv", tokens=12, window=4))
    generate(model, ctx, agnostic, question_ids=question, max_new_tokens=1)
    aware = KVCache(model.config, policy=policies.build("snapkv", tokens=12, window=4, query_aware=True))
    generate(model, ctx, aware, question_ids=question, max_new_tokens=1)
    # Agnostic: 12 context rows + the 6 question tokens appended; aware: 12 rows in all, among
    # them the last 4 question tokens (its observation window).
    pos_ag = agnostic.layers[0].groups[0].positions[0, :, 0].tolist()
    pos_aw = aware.layers[0].groups[0].positions[0, :, 0].tolist()
    assert len(pos_ag) == 18 and set(range(40, 46)) <= set(pos_ag)
    assert max(p for p in pos_ag if p < 40) == 39  # the context's own window was kept
    assert len(pos_aw) == 12 and set(range(42, 46)) <= set(pos_aw)


def test_chunked_prefill_peak_follows_budget() -> None:
    model = tiny_model("llama")
    cache = KVCache(model.config, policy=policies.build("h2o", tokens=16))
    ids = random_ids(1, 96)
    peak = 0
    for start in range(0, 96, 8):
        prefill(model, ids[:, start : start + 8], cache)
        peak = max(peak, cache.nbytes())
    assert peak == kv_bytes(model, 16)  # never more than the budget between chunks


def test_h2o_mass_is_accumulated_attention() -> None:
    """Without eviction, each row's mass equals the attention it received, summed over queries
    and over the query heads of its KV head (eager attention weights as the reference)."""
    model = tiny_model("llama")
    ids = random_ids(1, 24)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    cache = KVCache(model.config, policy=policies.build("h2o", tokens=24))
    prefill(model, ids, cache)
    for li, layer in enumerate(cache.layers):
        ref = att[li][0].sum(dim=1).view(2, 2, 24).sum(dim=1)  # (Hkv, T)
        torch.testing.assert_close(layer.groups[0].mass[0].T.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling,kernel,reduce", [("avg", 5, "mean"), ("max", 7, "max")])
def test_snapkv_keeps_the_window_votes(pooling: str, kernel: int, reduce: str) -> None:
    """The rows SnapKV keeps are the top-k of the observation window's pooled attention."""
    model = tiny_model("llama", layers=1)
    ids = random_ids(1, 40)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions[0][0]  # (H, T, T)
    votes = att[:, -8:, :].mean(dim=1)[:, None]  # (H, 1, T)
    if pooling == "avg":
        pooled = torch.nn.functional.avg_pool1d(votes, kernel, 1, kernel // 2, count_include_pad=False)[:, 0]
    else:
        pooled = torch.nn.functional.max_pool1d(votes, kernel, 1, kernel // 2)[:, 0]
    per_kv = pooled.view(2, 2, 40)  # (Hkv, R, T)
    per_kv = per_kv.mean(dim=1) if reduce == "mean" else per_kv.amax(dim=1)
    per_kv[:, -8:] = float("inf")
    policy = policies.build("snapkv", tokens=20, window=8, kernel=kernel, pooling=pooling,
                            group_reduce=reduce)
    cache = KVCache(model.config, policy=policy)
    prefill(model, ids, cache)
    g = cache.layers[0].groups[0]
    for h in range(2):
        # Ties (max pooling repeats a value over neighbours) go to the earlier token.
        want = set(per_kv[h].sort(descending=True, stable=True).indices[:20].tolist())
        assert set(g.positions[0, :, h].tolist()) == want


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("snapkv", {"ratio": 0.0}, "ratio"),
        ("snapkv", {"ratio": 1.5}, "ratio"),
        ("h2o", {"ratio": -0.2}, "ratio"),
        ("streaming", {"tokens": 5, "sinks": 4, "window": 2}, "tokens=5"),
        ("snapkv", {"tokens": 16, "window": 32}, "tokens=16"),
        ("snapkv", {}, "exactly one budget"),
        ("snapkv", {"tokens": 40, "ratio": 0.5}, "exactly one budget"),
        ("full", {"ratio": 0.5}, "no budget"),
        ("snapkv", {"tokens": 40, "bogus": 1}, "bogus"),
        ("nope", {"tokens": 40}, "unknown kv policy"),
    ],
)
def test_bad_budgets_raise(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        policies.build(name, **kwargs)


def test_ratio_one_keeps_everything_and_names_listed() -> None:
    model = tiny_model("llama")
    cache = KVCache(model.config, policy=policies.build("snapkv", ratio=1.0, window=4))
    prefill(model, random_ids(1, 30), cache)
    assert cache.nbytes() == cache.full_nbytes()
    assert {"full", "streaming", "h2o", "snapkv", "pyramidkv"} <= set(policies.names())


def test_bad_cache_arguments() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prefill_chunk"):
        KVCache(model.config, prefill_chunk=0)
    with pytest.raises(ValueError, match="policy must be"):
        KVCache(model.config, policy="snapkv")
    cache = KVCache(model.config)
    ids = random_ids(1, 8)
    bad_mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left padding"):
        prefill(model, ids, cache, attention_mask=bad_mask)


FORKABLE = [
    ("snapkv", {"tokens": 14, "window": 4}),
    ("h2o", {"ratio": 0.4}),
    ("pyramidkv", {"tokens": 14, "window": 4}),
    ("streaming", {"tokens": 10}),
    ("cake", {"tokens": 14, "window": 4}),
]


@pytest.mark.parametrize("name,cfg", FORKABLE)
def test_fork_of_a_full_prefill_equals_running_the_policy(name: str, cfg: dict) -> None:
    """One observed full prefill, forked, gives the same cache and answers as running the policy."""
    model = tiny_model("llama", layers=3)
    ids, question = random_ids(1, 44), random_ids(1, 5, seed=8)
    base = KVCache(model.config, policy=policies.build("full", observe_window=8, observe_mass=True))
    prefill(model, ids, base)
    forked = base.fork(policies.build(name, **cfg))
    direct = KVCache(model.config, policy=policies.build(name, **cfg))
    prefill(model, ids, direct)
    for a, b in zip(forked.layers, direct.layers, strict=True):
        for ga, gb in zip(a.groups, b.groups, strict=True):
            assert torch.equal(ga.positions, gb.positions)
            torch.testing.assert_close(ga.keys, gb.keys, atol=1e-12, rtol=0)
    forked.freeze()
    direct.freeze()
    out_f = greedy(model, forked, prefill(model, question, forked), max_new_tokens=6)
    out_d = greedy(model, direct, prefill(model, question, direct), max_new_tokens=6)
    assert torch.equal(out_f, out_d)
