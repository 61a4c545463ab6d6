"""Robustness of the KV cache beyond the tiny Llama/Qwen2 of the other tests: other decoder
architectures, GQA ratios, budgets larger than the prompt, one-token prompts, prefill chunks that
leave a one-column remainder under left padding, eos stopping, and clear errors for bad inputs.

Every test states a property (equal tokens or logits to a reference, exact bytes, exact errors);
models are tiny, random and float64 (the PyTorch reference path, fast under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from kvtiny import VOCAB, masked_logits, random_ids, tiny_model

from memlab.kvcache import KVCache, decode_step, generate, policies, prefill, run_prompt, teacher_force

# --- tiny models of other architectures (constructed offline, no hub) ----------------------------
ARCH_EXTRA = {
    "Mistral": {},  # default sliding_window=4096: longer than every context here
    "Qwen3": {},
    "Phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "Gemma": {"head_dim": 16},
    "Olmo2": {},
    "Granite": {"attention_multiplier": 0.6},  # a softmax scale other than head_dim ** -0.5
}


def arch_model(arch: str, **options):
    return tiny_model(arch, **{**ARCH_EXTRA.get(arch, {}), **options})


def hf_greedy(model, ids: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    model.config._attn_implementation = "sdpa"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def left_padded(lengths: list[int], seed: int = 20) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(ids, mask) of sequences of ``lengths`` left-padded to the longest, and each sequence alone."""
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    alone = []
    for i, n in enumerate(lengths):
        x = random_ids(1, n, seed=seed + i)
        ids[i, t - n:], mask[i, t - n:] = x[0], 1
        alone.append(x)
    return ids, mask, alone


def elt_bytes(model) -> int:
    """Bytes of one (row, KV head) of keys and values (float64)."""
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * d * 8


def build(name: str, n_layers: int = 2, n_kv: int = 2, **cfg) -> policies.Policy:
    if name == "duo":
        cfg.setdefault("gates", torch.rand(n_layers, n_kv, generator=torch.Generator().manual_seed(3)))
    return policies.build(name, **cfg)


# --- full policy == transformers on other architectures and GQA ratios ---------------------------
@pytest.mark.parametrize(
    "arch,heads,kv_heads",
    [("Mistral", 6, 2), ("Qwen3", 4, 1), ("Phi3", 4, 4), ("Gemma", 3, 1), ("Olmo2", 4, 2), ("Granite", 6, 2)],
)
def test_full_policy_equals_transformers_greedy(arch: str, heads: int, kv_heads: int) -> None:
    """Padded batch of 3, prefill chunk 4 that leaves a one-column remainder (13 = 3 * 4 + 1):
    the tokens are transformers' own greedy ones and the cache holds every column's real rows."""
    model = arch_model(arch, heads=heads, kv_heads=kv_heads)
    ids, mask, _ = left_padded([13, 9, 1])
    ref = hf_greedy(model, ids, 4, mask)
    cache = KVCache(model.config)
    got = generate(model, ids, cache, attention_mask=mask, max_new_tokens=4, chunk=4)
    assert torch.equal(got, ref)
    # 3 decoding steps fed; each sequence holds its own real tokens, storage pads to the longest.
    rows = cache.kept_tokens()[:, :, 0]  # (L, B)
    assert rows.tolist() == [[16, 12, 4]] * 2
    assert cache.nbytes() == 2 * 3 * 16 * kv_heads * elt_bytes(model)


# --- budgets ----------------------------------------------------------------------------------------
UNIFORM = [("streaming", {"sinks": 2}), ("h2o", {}), ("snapkv", {"window": 3}), ("alisa", {"history": 3})]


@pytest.mark.parametrize("arch,heads,kv_heads", [("Qwen3", 6, 2), ("Mistral", 4, 4), ("Olmo2", 4, 1)])
@pytest.mark.parametrize("budget", [{"tokens": 7}, {"ratio": 0.3}])
def test_uniform_policies_hold_exactly_their_bytes(
    arch: str, heads: int, kv_heads: int, budget: dict
) -> None:
    model = arch_model(arch, heads=heads, kv_heads=kv_heads)
    t, n = 23, 7  # ceil(0.3 * 23) == 7
    ids = random_ids(2, t, seed=4)
    for name, cfg in UNIFORM:
        policy = policies.build(name, **budget, **cfg)
        cache = KVCache(model.config, policy=policy)
        prefill(model, ids, cache, chunk=5)
        assert (cache.kept_tokens() == n).all(), name
        assert cache.nbytes() == 2 * 2 * kv_heads * n * elt_bytes(model), name
        generate(model, random_ids(2, 1, seed=5), cache, max_new_tokens=4)
        want = n if policy.compress_decoding else n + 4  # the fed token and 3 generated ones
        assert (cache.kept_tokens() == want).all(), name


@pytest.mark.parametrize("name", ["pyramidkv", "cake"])
@pytest.mark.parametrize("budget", [{"tokens": 6}, {"ratio": 0.2}])
def test_layer_budgets_sum_to_the_total(name: str, budget: dict) -> None:
    """Layer-adaptive policies split layers x budget exactly; one sequence, so bytes are exact too."""
    model = arch_model("Qwen3", layers=3, heads=6, kv_heads=2)
    t, n = 29, 6  # ceil(0.2 * 29) == 6
    cache = KVCache(model.config, policy=policies.build(name, **budget, window=3))
    prefill(model, random_ids(1, t, seed=6), cache, chunk=7)
    kept = cache.kept_tokens()[:, 0]  # (L, Hkv)
    assert (kept == kept[:, :1]).all()  # the heads of a layer share its budget
    assert int(kept[:, 0].sum()) == 3 * n and (kept >= 3).all()
    assert cache.nbytes() == 2 * int(kept[:, 0].sum()) * elt_bytes(model)


@pytest.mark.parametrize("name,cfg", [("snapkv", {"window": 4}), ("pyramidkv", {"window": 4}),
                                      ("h2o", {}), ("streaming", {"sinks": 2})])
def test_ratio_one_keeps_the_whole_prompt(name: str, cfg: dict) -> None:
    model = tiny_model("qwen2", heads=6, kv_heads=2)
    ids, mask, _ = left_padded([17, 11])
    ref = hf_greedy(model, ids, 1, mask)
    cache = KVCache(model.config, policy=policies.build(name, ratio=1.0, **cfg))
    logits = run_prompt(model, ids, cache, attention_mask=mask, chunk=6)
    assert torch.equal(logits.argmax(-1), ref[:, 0])
    assert cache.kept_tokens()[:, :, 0].tolist() == [[17, 11]] * 2


# Budgets larger than prompt + generated tokens: no policy may evict anything, so every one of
# them gives transformers' greedy tokens. The decoding budget of a short prompt used to be capped
# at the prompt's length, so compress-while-decoding policies evicted each new token at once.
ROOMY = [
    ("full", {}),
    ("streaming", {"tokens": 12, "sinks": 4, "window": 4}),
    ("streaming", {"ratio": 0.5, "sinks": 4, "window": 8}),
    ("h2o", {"tokens": 12}),
    ("snapkv", {"tokens": 12, "window": 2, "compress_decoding": True}),
    ("pyramidkv", {"tokens": 12, "window": 2, "compress_decoding": True}),
    ("alisa", {"tokens": 12, "history": 2}),
    ("cake", {"tokens": 12, "window": 2}),
    ("cake", {"ratio": 0.5, "window": 12}),
    ("duo", {"ratio": 0.5, "sinks": 4, "window": 8}),
    ("delta", {"tokens": 12, "page": 2, "recent_pages": 1}),
    ("gemfilter", {"tokens": 12, "filter_layer": 1}),
]


@pytest.mark.parametrize("name,cfg", ROOMY)
@pytest.mark.parametrize("t", [1, 3])
def test_budget_above_the_context_changes_nothing(name: str, cfg: dict, t: int) -> None:
    """One-token and three-token prompts (shorter than sinks + window), batch of 2, 6 new tokens."""
    model = tiny_model("llama")
    ids = random_ids(2, t, seed=7)
    cache = KVCache(model.config, policy=build(name, **cfg))
    got = generate(model, ids, cache, max_new_tokens=6, chunk=2)
    assert torch.equal(got, hf_greedy(model, ids, 6))
    assert (cache.kept_tokens() == t + 5).all()


def test_streaming_short_prompt_grows_to_its_budget_then_slides() -> None:
    """A 3-token prompt under tokens=8, sinks=2: decoding keeps everything until 8 rows are held,
    then the sinks and the most recent rows; the logits equal the full model under that mask."""
    model = tiny_model("qwen2")
    t, n_new, budget, sinks = 3, 10, 8, 2
    ids = random_ids(1, t + n_new, seed=8)
    cache = KVCache(model.config, policy=policies.build("streaming", tokens=budget, sinks=sinks))
    got = [prefill(model, ids[:, :t], cache)]
    for i in range(t, t + n_new - 1):
        got.append(prefill(model, ids[:, i : i + 1], cache))
    n = ids.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    # Query i finds min(i, budget) rows and joins them.
    allowed = (k <= q) & ((q <= budget) | (k < sinks) | (k >= q - (budget - sinks)))
    ref = masked_logits(model, ids, allowed)
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits[0], ref[t - 1 + j], atol=1e-9, rtol=0)
    assert (cache.kept_tokens() == budget).all()


GROWING = [
    ("h2o", {"tokens": 4}),
    ("alisa", {"tokens": 4, "history": 2, "refresh": 2}),
    ("streaming", {"tokens": 4, "sinks": 1}),
    ("cake", {"tokens": 4, "window": 2}),
    ("snapkv", {"ratio": 0.5, "window": 1, "compress_decoding": True}),
]


@pytest.mark.parametrize("name,cfg", GROWING)
def test_short_prompts_grow_to_the_budget_then_evict_as_when_alone(name: str, cfg: dict) -> None:
    """Prompts of 2, 1 and 5 tokens under a budget of 4 (or half the prompt), 8 new tokens: some
    sequences grow while another evicts; a padded batch equals each sequence alone."""
    model = tiny_model("llama", layers=3)
    ids, mask, alone = left_padded([2, 1, 5], seed=30)
    cache = KVCache(model.config, policy=policies.build(name, **cfg))
    batch = generate(model, ids, cache, attention_mask=mask, max_new_tokens=8, chunk=2)
    for i, x in enumerate(alone):
        one = generate(model, x, KVCache(model.config, policy=policies.build(name, **cfg)), max_new_tokens=8,
                       chunk=2)
        assert torch.equal(batch[i], one[0]), i


# --- prefill chunks, padding, batches ------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 12])
def test_chunked_padded_prefill_equals_one_shot(chunk: int) -> None:
    """Chunks that do not divide T (one-column first chunks included) over a left-padded batch:
    last logits equal the one-shot prefill, and no padding column is ever stored."""
    model = tiny_model("llama", heads=6, kv_heads=2)
    ids, mask, _ = left_padded([11, 6, 2])
    ref = prefill(model, ids, KVCache(model.config), attention_mask=mask)
    cache = KVCache(model.config)
    got = prefill(model, ids, cache, attention_mask=mask, chunk=chunk)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    assert cache.kept_tokens()[:, :, 0].tolist() == [[11, 6, 2]] * 2
    for layer in cache.layers:
        g = layer.groups[0]
        for b, n in enumerate((11, 6, 2)):
            assert g.positions[b, :n, 0].tolist() == list(range(n))


BATCHED = [
    ("full", {}),
    ("streaming", {"tokens": 6, "sinks": 2}),
    ("h2o", {"ratio": 0.4}),
    ("snapkv", {"tokens": 6, "window": 2}),
    ("pyramidkv", {"ratio": 0.5, "window": 2}),
    ("alisa", {"tokens": 5, "history": 2}),
    ("cake", {"tokens": 6, "window": 2}),
    ("duo", {"ratio": 0.5, "sinks": 1, "window": 3}),
    ("delta", {"tokens": 4, "page": 2, "recent_pages": 1}),
    ("gemfilter", {"ratio": 0.5, "filter_layer": 1}),
]


@pytest.mark.parametrize("name,cfg", BATCHED)
@pytest.mark.parametrize("query_aware", [False, True])
def test_padded_batch_of_three_equals_each_alone(name: str, cfg: dict, query_aware: bool) -> None:
    """Lengths 17, 9, 1 with a question, chunk 4 (17 = 4 * 4 + 1: a one-column first chunk)."""
    model = tiny_model("llama", heads=6, kv_heads=2)
    ids, mask, alone = left_padded([17, 9, 1])
    question = random_ids(3, 3, seed=9)
    if name != "full":
        cfg = {**cfg, "query_aware": query_aware}
    batch = generate(model, ids, KVCache(model.config, policy=build(name, **cfg)), attention_mask=mask,
                     question_ids=question, max_new_tokens=4, chunk=4)
    for i, x in enumerate(alone):
        one = generate(model, x, KVCache(model.config, policy=build(name, **cfg)),
                       question_ids=question[i : i + 1], max_new_tokens=4, chunk=4)
        assert torch.equal(batch[i], one[0]), i
    if name == "full":
        full_ids = torch.cat([ids, question], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(question)], dim=1)
        assert torch.equal(batch, hf_greedy(model, full_ids, 4, full_mask))


@pytest.mark.parametrize("name,cfg", [("full", {}), ("snapkv", {"tokens": 5, "window": 2}),
                                      ("h2o", {"tokens": 5}), ("cake", {"tokens": 5, "window": 2})])
@pytest.mark.parametrize("n_new", [1, 3])
def test_transformers_generate_loop_equals_memlab_loop(name: str, cfg: dict, n_new: int) -> None:
    model = tiny_model("qwen2", heads=4, kv_heads=1)
    ids, mask, _ = left_padded([12, 7, 3])
    ours = generate(model, ids, KVCache(model.config, policy=build(name, n_kv=1, **cfg)),
                    attention_mask=mask, max_new_tokens=n_new)
    cache = KVCache(model.config, policy=build(name, n_kv=1, **cfg))
    theirs = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n_new,
                            do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert ours.shape == (3, n_new) and torch.equal(ours, theirs)


def test_teacher_forcing_equals_transformers_logprobs() -> None:
    model = arch_model("Qwen3")
    ids, mask, _ = left_padded([10, 6])
    answer = random_ids(2, 3, seed=11)
    full_ids, full_mask = torch.cat([ids, answer], 1), torch.cat([mask, torch.ones_like(answer)], 1)
    model.config._attn_implementation = "sdpa"
    pos = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(full_ids, attention_mask=full_mask, position_ids=pos).logits
    logp = torch.log_softmax(logits[:, 9:-1], dim=-1).gather(2, answer[:, :, None])[:, :, 0].sum(1)
    cache = KVCache(model.config)
    got = teacher_force(model, cache, run_prompt(model, ids, cache, attention_mask=mask, chunk=3), answer)
    torch.testing.assert_close(got, logp, atol=1e-9, rtol=0)


# --- eos -----------------------------------------------------------------------------------------
def test_eos_stops_each_row_and_decoding() -> None:
    """Each row stops at its first eos (of a list) and repeats that token; once every row stopped,
    no more decoding steps run."""
    model = tiny_model("llama")
    ids = random_ids(2, 9, seed=12)
    ref = generate(model, ids, KVCache(model.config), max_new_tokens=8)
    eos = [int(ref[1, 3]), int(ref[0, 2])]
    want, stops = ref.clone(), []
    for r in range(2):
        hits = [j for j in range(8) if int(ref[r, j]) in eos]
        if hits:
            want[r, hits[0]:] = ref[r, hits[0]]
        stops.append(hits[0] if hits else 8)
    cache = KVCache(model.config)
    got = generate(model, ids, cache, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(got, want)
    fed = min(max(stops), 7)  # tokens fed back: none after the step where the last row stopped
    assert cache.seen.tolist() == [9 + fed] * 2
    single = generate(model, ids, KVCache(model.config), max_new_tokens=8, eos_token_id=int(ref[0, 0]))
    assert (single[0] == ref[0, 0]).all() and torch.equal(single[1][: stops[1]], ref[1][: stops[1]])


# --- DELTA's default layout on shallow models ----------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_delta_default_layout_on_shallow_models_equals_full(layers: int) -> None:
    model = tiny_model("llama", layers=layers)
    ids = random_ids(1, 20, seed=13)
    got = generate(model, ids, KVCache(model.config, policy=policies.build("delta", ratio=1.0, page=4)),
                   max_new_tokens=4)
    assert torch.equal(got, hf_greedy(model, ids, 4))


# --- policies see the model's own attention scale ---------------------------------------------------
def test_gemfilter_ranks_with_the_models_softmax_scale() -> None:
    """Granite scales logits by attention_multiplier, not head_dim ** -0.5: GemFilter's selection
    is the top-k of the filter layer's actual attention (eager attention weights as reference)."""
    model = arch_model("Granite", layers=3)
    ids = random_ids(1, 40, seed=14)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions[1][0]  # (H, T, T)
    score = att[:, -1].sum(dim=0)
    score[-1] = float("inf")
    want = set(score.topk(10).indices.tolist())
    policy = policies.build("gemfilter", tokens=10, filter_layer=1)
    cache = KVCache(model.config, policy=policy)
    policy.select_input(model, ids, None, None, cache)
    assert set(cache.state["gemfilter_columns"][0].tolist()) == want


def test_cake_scores_with_the_models_softmax_scale() -> None:
    """One layer: CAKE keeps the window and the top of mean + gamma * variance of the window
    queries' attention (avg-pooled, averaged over the query heads of a KV head), with the
    attention the model computes."""
    model = arch_model("Granite", layers=1)
    t, w, n, gamma, kernel = 36, 4, 14, 200.0, 5
    ids = random_ids(1, t, seed=15)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions[0][0].double()  # (H, T, T)
    win = att[:, -w:]  # (H, W, T)
    indicator = win.mean(dim=1) + gamma * win.var(dim=1, unbiased=False)  # (H, T)
    pooled = torch.nn.functional.avg_pool1d(indicator[:, None], kernel, 1, kernel // 2,
                                            count_include_pad=False)[:, 0]
    per_kv = pooled.view(2, 2, t).mean(dim=1)
    per_kv[:, -w:] = float("inf")
    policy = policies.build("cake", tokens=n, window=w, kernel=kernel, gamma=gamma)
    cache = KVCache(model.config, policy=policy)
    prefill(model, ids, cache)
    g = cache.layers[0].groups[0]
    for h in range(2):
        assert set(g.positions[0, :, h].tolist()) == set(per_kv[h].topk(n).indices.tolist())


# --- bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("h2o", {"ratio": 1.01}, r"ratio=1\.01 must be in \(0, 1\]"),
        ("streaming", {"ratio": 0}, r"ratio=0 must be in \(0, 1\]"),
        ("cake", {"ratio": float("nan")}, r"ratio=nan must be in \(0, 1\]"),
        ("alisa", {"tokens": -3}, r"tokens=-3 must be an int >= 1"),
        ("h2o", {"tokens": 0}, r"tokens=0 must be an int >= 1"),
        ("snapkv", {"tokens": 2.5}, r"tokens=2\.5 must be an int"),
        ("delta", {"tokens": 64, "pages": 4}, r"unknown config key\(s\) \['pages'\].*'delta'"),
        ("snapKV", {"ratio": 0.5}, r"unknown kv policy 'snapKV'; expected one of: .*snapkv"),
        ("snapkv", {"ratio": 0.5, "pooling": "mean"}, r"pooling='mean' must be 'avg' or 'max'"),
    ],
)
def test_bad_policy_arguments_name_argument_value_and_expectation(
    name: str, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        policies.build(name, **kwargs)


def test_bad_generation_inputs_raise_clear_errors() -> None:
    model = tiny_model("llama")
    ids = random_ids(2, 6)
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"left padding only.*row 1 is \[1, 1, 1, 1, 0, 0\]"):
        generate(model, ids, KVCache(model.config), attention_mask=right, max_new_tokens=2)
    with pytest.raises(ValueError, match="left padding only"):  # transformers' own loop
        model.generate(ids, attention_mask=right, past_key_values=KVCache(model.config), max_new_tokens=2,
                       pad_token_id=0)
    with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
        prefill(model, ids, KVCache(model.config), chunk=0)
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) int64 tensor, got \(2, 6\) .*int32"):
        generate(model, ids.int(), KVCache(model.config))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        generate(model, ids, KVCache(model.config), max_new_tokens=0)
    with pytest.raises(ValueError, match="decode_step needs a prefilled cache"):
        decode_step(model, KVCache(model.config), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"mask of input_ids has shape \(2, 5\), expected \(2, 6\)"):
        prefill(model, ids, KVCache(model.config), attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_sliding_window_models_refuse_contexts_beyond_the_window() -> None:
    """Mistral with sliding_window=8 attends to the last 8 tokens only; the cache matches it while
    the context fits in the window and refuses (instead of silently differing) beyond it."""
    model = arch_model("Mistral", sliding_window=8)
    ids = random_ids(1, 5, seed=16)
    got = generate(model, ids, KVCache(model.config), max_new_tokens=4)
    assert torch.equal(got, hf_greedy(model, ids, 4))
    with pytest.raises(ValueError, match=r"sliding_window=8 .* 9 columns"):
        generate(model, ids, KVCache(model.config), max_new_tokens=6)


def test_softcapped_attention_is_refused() -> None:
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, layer_types=["full_attention"] * 2, attn_logit_softcapping=5.0,
    )
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=5\.0, expected None"):
        KVCache(cfg)


def test_budget_formula_matches_its_documentation() -> None:
    """ratio keeps ceil(r * seen) (at least the protected tokens, at most the tokens seen)."""
    seen = torch.tensor([1, 3, 10, 29, 100])
    for r in (0.1, 0.3, 0.5, 1.0):
        got = policies.build("snapkv", ratio=r, window=4).budget(seen).tolist()
        want = [min(s, max(4, math.ceil(round(r * s, 9)))) for s in seen.tolist()]
        assert got == want, r


# --- selecting and reordering rows of the batch (beam search, contrastive search) ----------------
@pytest.mark.parametrize("name,cfg", BATCHED)
def test_selecting_batch_rows_mid_decoding_equals_decoding_those_rows(name: str, cfg: dict) -> None:
    """``batch_select_indices`` (what beam search's ``reorder_cache`` calls) after a few decoding
    steps: the selected rows then decode exactly as the same rows of the unselected cache, with
    left padding (the mask, the frozen prompt lengths) and eviction during decoding (ALISA's host
    tier, DELTA's selections) moved along."""
    model = tiny_model("llama", heads=6, kv_heads=2)
    ids, mask, _ = left_padded([17, 9, 13])
    question = random_ids(3, 3, seed=9)
    pick = torch.tensor([2, 0, 0, 1])  # a reorder with a repeat, as beam search makes

    def start() -> tuple[KVCache, torch.Tensor]:
        cache = KVCache(model.config, policy=build(name, **cfg))
        nxt = run_prompt(model, ids, cache, attention_mask=mask, question_ids=question, chunk=4).argmax(-1)
        for _ in range(3):
            nxt = decode_step(model, cache, nxt).argmax(-1)
        return cache, nxt

    ref_cache, ref_tok = start()
    cache, tok = start()
    cache.batch_select_indices(pick)
    tok = tok[pick]
    assert torch.equal(cache.seen, ref_cache.seen[pick])
    for step in range(4):
        ref = decode_step(model, ref_cache, ref_tok)
        got = decode_step(model, cache, tok)
        torch.testing.assert_close(got, ref[pick], rtol=0, atol=1e-10, msg=f"{name} step {step}")
        ref_tok, tok = ref.argmax(-1), got.argmax(-1)
    assert cache.nbytes() == sum(
        g.nbytes() for lay in cache.layers for g in lay.groups
    ) and cache.kept_tokens().shape[1] == len(pick)


def test_full_policy_beam_search_equals_transformers() -> None:
    """transformers' beam search (its ``reorder_cache`` every step) over a padded batch."""
    model = tiny_model("llama", heads=6, kv_heads=2)
    ids, mask, _ = left_padded([17, 9, 13])
    kw = {"attention_mask": mask, "num_beams": 3, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    model.config._attn_implementation = "sdpa"
    ref = model.generate(ids, **kw)
    got = model.generate(ids, past_key_values=KVCache(model.config, policy=policies.build("full")), **kw)
    assert torch.equal(got, ref)
