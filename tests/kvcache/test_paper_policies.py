"""Defining properties of the paper policies: CAKE, DuoAttention, DELTA, GemFilter, ALISA."""

from __future__ import annotations

import pytest
import torch
from kvtiny import masked_logits, random_ids, tiny_model

import memlab.kvcache.cache as cache_mod
from memlab.kvcache import KVCache, generate, policies, prefill
from memlab.kvcache.calibrate import calibrate_duo
from memlab.kvcache.policies.alisa import host_nbytes
from memlab.kvcache.policies.duo import load_gates, retrieval_heads, save_gates


def kv_bytes(model, tokens: int) -> int:
    c = model.config
    return 2 * tokens * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 8


# --- CAKE --------------------------------------------------------------------------------------
def test_cake_total_budget_respected_and_layers_differ() -> None:
    model = tiny_model("llama", layers=4)
    cache = KVCache(model.config, policy=policies.build("cake", tokens=20, window=8))
    prefill(model, random_ids(1, 80), cache)
    kept = cache.kept_tokens()[:, 0, 0]  # (L,) rows per layer (both KV heads share the layer budget)
    assert int(kept.sum()) == 4 * 20
    assert len(set(kept.tolist())) > 1  # preferences differ between layers
    assert cache.nbytes() == 4 * kv_bytes(model, 20)
    assert (kept >= 8).all()  # every layer keeps at least its observation window
    generate(model, random_ids(1, 1, seed=3), cache, max_new_tokens=6)
    assert torch.equal(cache.kept_tokens()[:, 0, 0], kept)  # decoding keeps each layer's budget


def test_cake_cascade_bounds_memory_during_prefill() -> None:
    """After each layer of the prefill, all layers so far hold at most the total budget (plus the
    current layer's own prompt before its eviction): memory never reaches the full cache."""
    model = tiny_model("llama", layers=4)
    policy = policies.build("cake", tokens=12, window=4)
    cache = KVCache(model.config, policy=policy)
    seen_totals = []
    original = policy.cascade

    def spy(c, upto, scale):
        original(c, upto, scale)
        seen_totals.append(sum(int(c.layers[i].head_lengths()[0, 0]) for i in range(upto + 1)))

    policy.cascade = spy
    prefill(model, random_ids(1, 60), cache)
    assert seen_totals[-1] == 4 * 12
    assert all(t <= 4 * 12 for t in seen_totals[1:])


# --- DuoAttention --------------------------------------------------------------------------------
GATES = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.05, 0.01], [0.7, 0.6]])


def test_duo_streaming_heads_hold_constant_memory() -> None:
    model = tiny_model("llama", layers=4)
    policy = policies.build("duo", ratio=0.5, gates=GATES, sinks=2, window=6)
    cache = KVCache(model.config, policy=policy)
    prefill(model, random_ids(1, 50), cache)
    ret = retrieval_heads(GATES, 0.5)
    assert ret.tolist() == [[True, False], [False, True], [False, False], [True, True]]
    for step in range(5):
        kept = cache.kept_tokens()[:, 0]  # (L, Hkv)
        seen = int(cache.seen[0])
        assert torch.equal(kept, torch.where(ret, torch.tensor(seen), torch.tensor(8)))
        # Streaming heads live in their own storage: their bytes are 8 rows, not the longest head's.
        want = sum(int(kept[li].sum()) for li in range(4))
        assert cache.nbytes() == kv_bytes(model, want) // 2
        prefill(model, random_ids(1, 1, seed=20 + step), cache)


def test_duo_all_streaming_equals_sink_window_attention() -> None:
    """With every head streaming, the model computes StreamingLLM attention (sinks + window) for
    every token, prompt included: the full model under that mask gives the same logits."""
    model = tiny_model("qwen2", layers=2)
    sinks, window, t = 2, 5, 30
    ids = random_ids(1, t + 4)
    cache = KVCache(model.config, policy=policies.build("duo", ratio=0.0, gates=torch.rand(2, 2),
                                                        sinks=sinks, window=window))
    got = [prefill(model, ids[:, :t], cache)]
    for i in range(t, t + 3):
        got.append(prefill(model, ids[:, i : i + 1], cache))
    n = ids.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (k <= q) & ((k > q - window) | (k < sinks))
    ref = masked_logits(model, ids, allowed)
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits[0], ref[t - 1 + j], atol=1e-9, rtol=0)


def test_duo_gates_round_trip_and_bad_budget(tmp_path) -> None:
    path = save_gates(tmp_path / "g.safetensors", GATES, {"steps": 3})
    gates, meta = load_gates(path)
    assert torch.equal(gates, GATES) and meta["steps"] == 3
    policy = policies.build("duo", ratio=0.25, gates=str(path))
    assert int(policy._retrieval.sum()) == 2
    with pytest.raises(ValueError, match="ratio="):
        policies.build("duo", tokens=10, gates=GATES)
    with pytest.raises(ValueError, match="calibrate duo"):
        policies.build("duo", ratio=0.5)


def test_duo_calibration_closes_unused_heads() -> None:
    """A head whose output the model discards costs nothing to make streaming: its gate falls to
    0 under the L1 term, while heads that matter keep higher gates."""
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        # Layer 1, KV head 1 feeds query heads 2 and 3: cut them from the output projection.
        model.model.layers[1].self_attn.o_proj.weight[:, 32:] = 0.0
    prompts = [random_ids(1, 40, seed=s)[0] for s in range(3)]
    result = calibrate_duo(model, None, steps=40, prompts=prompts, answer_lengths=[8, 8, 8], sinks=1,
                           window=4, lr=0.05, l1=0.2)
    g = result.gates
    assert g.shape == (2, 2) and ((g >= 0) & (g <= 1)).all()
    assert g[1, 1] < 0.05
    assert g[1, 1] < g.flatten()[:3].min() - 0.2
    assert result.losses[-1] < 0.5


# --- DELTA ---------------------------------------------------------------------------------------
def test_delta_sparse_layers_read_only_selected_rows(monkeypatch) -> None:
    model = tiny_model("llama", layers=6)
    policy = policies.build("delta", tokens=16, page=4, recent_pages=1, full_layers=[0], delta_layers=[1, 4])
    cache = KVCache(model.config, policy=policy)
    prefill(model, random_ids(1, 60), cache)
    reads: dict[int, list[int]] = {}
    real = cache_mod.ragged_decode

    def spy(q, k, v, lengths, scale, window=None, sinks=0):
        reads.setdefault(len(reads) % 6, []).append(int(lengths.max()))
        return real(q, k, v, lengths, scale, window=window, sinks=sinks)

    monkeypatch.setattr(cache_mod, "ragged_decode", spy)
    prefill(model, random_ids(1, 1, seed=4), cache)  # one decoding step: 61 tokens held
    # Layers 0, 1, 4 read all 61 rows; 2, 3, 5 read the 4 selected pages of 4 tokens: 3 full
    # pages by score and the recent page, which holds only the newest token (60 = 15 * 4).
    assert [reads[i][0] for i in range(6)] == [61, 61, 13, 13, 61, 13]
    rows, n = cache.state["delta_rows"]
    assert int(n[0]) == 13 and int(rows[0, 12]) == 60  # the newest token is read
    assert (rows[0, :12] % 4 == torch.arange(12) % 4).all()  # whole pages
    assert cache.nbytes() == 6 * kv_bytes(model, 61)  # DELTA keeps the full cache
    assert cache.attended_ratio() == pytest.approx((3 * 61 + 3 * 13) / (6 * 61))


def test_delta_with_everything_selected_equals_full() -> None:
    model = tiny_model("llama", layers=6)
    ids = random_ids(1, 40)
    full = generate(model, ids, KVCache(model.config), max_new_tokens=8)
    delta = generate(model, ids, KVCache(model.config, policy=policies.build("delta", ratio=1.0, page=4)),
                     max_new_tokens=8)
    assert torch.equal(full, delta)


# --- GemFilter -----------------------------------------------------------------------------------
def test_gemfilter_selects_by_filter_layer_attention_and_skips_upper_layers() -> None:
    model = tiny_model("llama", layers=4)
    ids = random_ids(1, 48)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions[1][0]  # layer 1: (H, T, T)
    want = att[:, -1].sum(dim=0)
    want[-1] = float("inf")  # the query token itself is always kept
    want = set(want.topk(12).indices.tolist())
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    policy = policies.build("gemfilter", tokens=12, filter_layer=1)
    cache = KVCache(model.config, policy=policy)
    selected, mask, _ = policy.select_input(model, ids, None, None, cache)
    assert calls == [0, 1]  # the filter pass stopped in layer 1: layers 2 and 3 never ran
    for h in hooks:
        h.remove()
    cols = cache.state["gemfilter_columns"][0].tolist()
    assert set(cols) == want and cols == sorted(cols)
    assert torch.equal(selected[0], ids[0, cols]) and mask is None
    generate(model, ids, KVCache(model.config, policy=policy), max_new_tokens=4)


def test_gemfilter_cache_holds_the_selection() -> None:
    model = tiny_model("qwen2", layers=3)
    cache = KVCache(model.config, policy=policies.build("gemfilter", ratio=0.25, filter_layer=1))
    generate(model, random_ids(1, 64), cache, question_ids=random_ids(1, 4, seed=2), max_new_tokens=3)
    # 16 selected context tokens + 4 question tokens + 2 generated tokens fed back.
    assert cache.nbytes() == 3 * kv_bytes(model, 22)
    plain = KVCache(model.config, policy=policies.build("gemfilter", ratio=0.25, filter_layer=1))
    with pytest.raises(ValueError, match="selects the input"):
        model.generate(random_ids(1, 64), past_key_values=plain, max_new_tokens=2, pad_token_id=0)


# --- ALISA ---------------------------------------------------------------------------------------
def test_alisa_keeps_local_and_recently_attended_tokens() -> None:
    model = tiny_model("llama", layers=1)
    ids = random_ids(1, 40)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions[0][0]  # (H, T, T)
    importance = att[:, -4:].sum(dim=1).view(2, 2, 40).mean(dim=1)  # (Hkv, T) last 4 queries
    importance[:, -8:] = float("inf")  # local: half of the 16-token budget
    cache = KVCache(model.config, policy=policies.build("alisa", tokens=16, history=4))
    prefill(model, ids, cache)
    g = cache.layers[0].groups[0]
    for h in range(2):
        assert set(g.positions[0, :, h].tolist()) == set(importance[h].topk(16).indices.tolist())
    assert cache.nbytes() == kv_bytes(model, 16)


def test_alisa_default_host_tier_holds_at_most_the_device_budget() -> None:
    model = tiny_model("llama", layers=2)
    cache = KVCache(model.config, policy=policies.build("alisa", tokens=8, history=4))
    prefill(model, random_ids(1, 40), cache)
    for (layer, group), tier in cache.state["alisa_host"].items():
        kept = cache.layers[layer].groups[group].lengths
        assert int(tier["lengths"].max()) <= int(kept.max()) == 8


def test_alisa_offloads_evicted_tokens_and_caps_the_host_tier() -> None:
    model = tiny_model("llama", layers=2)
    cache = KVCache(model.config, policy=policies.build("alisa", tokens=12, history=4, host_tokens=20))
    prefill(model, random_ids(1, 30), cache)
    tier = cache.state["alisa_host"][(0, 0)]
    dev = set(cache.layers[0].groups[0].positions[0, :, 0].tolist())
    host = set(tier["positions"][0, : int(tier["lengths"][0, 0]), 0].tolist())
    assert dev | host == set(range(30)) and not dev & host  # phase II: nothing lost yet
    assert tier["keys"].device.type == "cpu" and host_nbytes(cache) > 0
    # held_nbytes counts the host tier with its bookkeeping beside the device tier (and the mask)
    mask = cache.state["mask"]
    extra = host_nbytes(cache, metadata=True) + mask.numel() * mask.element_size()
    assert cache.held_nbytes() == cache.nbytes() + cache.metadata_nbytes() + extra
    assert host_nbytes(cache, metadata=True) > host_nbytes(cache)
    for step in range(12):
        prefill(model, random_ids(1, 1, seed=40 + step), cache)
        assert cache.nbytes() == 2 * kv_bytes(model, 12)  # the device tier keeps its budget
    assert int(cache.state["alisa_host"][(0, 0)]["lengths"].max()) <= 20  # phase III cap
