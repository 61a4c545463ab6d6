"""KV-cache policies for Hugging Face causal LMs that free real memory.

``KVCache(model.config, policy=policies.build("snapkv", ratio=0.25))`` is a transformers cache;
``generate`` adds chunked prefill and the query-agnostic flow (context compressed before the
question).
"""

from memlab.kvcache import policies
from memlab.kvcache.attention import ATTN_NAME
from memlab.kvcache.cache import KVCache
from memlab.kvcache.generate import (
    answer_logprob,
    decode_step,
    generate,
    greedy,
    prefill,
    run_prompt,
    teacher_force,
)

__all__ = [
    "ATTN_NAME",
    "KVCache",
    "answer_logprob",
    "decode_step",
    "generate",
    "greedy",
    "policies",
    "prefill",
    "run_prompt",
    "teacher_force",
]
