"""Helpers for the KV-cache tests: tiny random Llama and Qwen2 models (no hub), in float64 so
that differences come from the cache, not from rounding."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97


def tiny_model(kind: str = "llama", *, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               **extra):
    """A tiny random causal LM in float64: ``kind`` "llama", "qwen2", or any transformers
    architecture prefix (``"Mistral"`` for MistralConfig / MistralForCausalLM); ``extra`` goes to
    its config."""
    torch.manual_seed(seed)
    arch = {"llama": "Llama", "qwen2": "Qwen2"}.get(kind, kind)
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=VOCAB,
        hidden_size=16 * heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        **extra,
    )
    cfg._attn_implementation = "sdpa"
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    # Larger than default init spreads attention, so that policies disagree on what to keep.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    # No end-of-sequence token: greedy references must run the full length, as memlab's loop does.
    model.generation_config.eos_token_id = None
    return model.double().eval()


def random_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


WORDS = (
    "[UNK] <s> </s> 0 1 2 3 4 5 6 7 8 9 . , ? ! The the grass is green sky blue sun yellow Here we go "
    "There and back again secret code codes for vault locker safe What are all One of Below a long text "
    "Somewhere in it Read carefully you will be asked pass key Remember"
).split()


def tiny_checkpoint(path, kind: str = "llama", layers: int = 2) -> None:
    """Save a tiny random model with a word-level tokenizer as a local Hugging Face checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(path)
    model = tiny_model(kind, layers=layers).float()
    model.config.attn_implementation = "sdpa"
    model.save_pretrained(path)


def masked_logits(model, ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The model's logits (T, V) for ids (1, T) when query i may attend only to keys j with
    ``allowed[i, j]`` ((T, T) bool): the dense reference of what an evicting cache computes."""
    t = ids.shape[1]
    mask = torch.zeros(1, 1, t, t, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    model.config._attn_implementation = "sdpa"  # eager would round its softmax to float32
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[0]
