"""Prefill in chunks and greedy generation over a ``KVCache``.

``model.generate(..., past_key_values=KVCache(...))`` works as it is; these helpers add what
``generate`` cannot express:
- chunked prefill (``chunk=`` or the cache's ``prefill_chunk``), so that the cache is compressed
  after every chunk and peak memory follows the budget rather than the prompt;
- the query-agnostic flow: the context is prefilled (and compressed) first, the cache is frozen,
  then the question is appended, as when one compressed context serves many questions. With
  ``policy.query_aware`` the question is part of the prefill that is compressed.
Both pass positions computed from the padding mask (left padding), as ``generate`` does.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from memlab.kvcache.cache import KVCache


def _cache_kwarg(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.2x; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _check_ids(name: str, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a (B, T) int64 tensor, got {got}")
    if ids.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got shape {tuple(ids.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"attention mask of {name} has shape {tuple(mask.shape)}, expected {tuple(ids.shape)}"
        )
    if mask is not None:
        # Checked here, before the model runs, so the error names the mask and the bad row.
        m = mask.long()
        bad = ((m != 0) & (m != 1)).any(dim=1) | (m[:, 1:] < m[:, :-1]).any(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"attention mask of {name} must be 0/1 with left padding only (0s before the 1s of "
                f"each row); row {row} is {m[row].tolist()}"
            )


@torch.no_grad()
def prefill(
    model: Any,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Feed ``input_ids`` (B, T) after what the cache holds; returns the last logits (B, V).

    ``attention_mask`` (B, T): 0 marks left padding. Chunks of ``chunk`` tokens (default: the
    cache's ``prefill_chunk``, else all at once), aligned to end at the last token.
    """
    _check_ids("input_ids", input_ids, attention_mask)
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a memlab KVCache, got {type(cache).__name__}")
    # ``chunk or ...`` took chunk=0 for "no chunk given" and silently ran the prompt at once.
    if chunk is None:
        chunk = cache.prefill_chunk or input_ids.shape[1]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    device = input_ids.device
    mask = attention_mask.to(device=device, dtype=torch.long) if attention_mask is not None else None
    if mask is None:
        mask = torch.ones_like(input_ids)
    past_mask = cache.state.get("mask")
    if past_mask is not None and past_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(f"batch size {input_ids.shape[0]} differs from the cached {past_mask.shape[0]}")
    seen = cache.seen.to(device) if cache.layers[0].is_initialized else torch.zeros(
        input_ids.shape[0], dtype=torch.long, device=device
    )
    t = input_ids.shape[1]
    # Chunks end at the last column (the first chunk takes the remainder): with left padding,
    # every sequence of a batch then meets the same chunk boundaries, counted in its own
    # tokens, as when it runs alone.
    bounds = [0] + list(range(t % chunk or chunk, t + 1, chunk))
    # A prompt of several tokens is a prefill even in chunks of one; a single token after a
    # prompt is a decoding step (and freezes the budget, as in generate).
    cache.state["prefilling"] = t > 1
    try:
        logits = _prefill_chunks(model, input_ids, mask, cache, bounds, seen, past_mask)
    finally:
        cache.state["prefilling"] = False
    return logits


def _prefill_chunks(
    model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: KVCache,
    bounds: list[int],
    seen: torch.Tensor,
    past_mask: torch.Tensor | None,
) -> torch.Tensor:
    key = _cache_kwarg(model)
    logits = None
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        ids_c = input_ids[:, start:end]
        mask_c = mask[:, start:end]
        full_mask = mask_c if past_mask is None else torch.cat([past_mask, mask_c], dim=1)
        pos = (seen[:, None] + mask_c.cumsum(dim=1) - 1).clamp(min=0)
        out = model(
            input_ids=ids_c,
            attention_mask=full_mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{key: cache},
        )
        logits = out.logits[:, -1]
        past_mask = full_mask
        seen = seen + mask_c.sum(dim=1)
    cache.state["mask"] = past_mask
    return logits


@torch.no_grad()
def run_prompt(
    model: Any,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    attention_mask: torch.Tensor | None = None,
    question_ids: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Prefill context (and question) as the policy's mode says, freeze; last logits (B, V)."""
    policy = cache.policy
    select = getattr(policy, "select_input", None)
    if select is not None:
        # Input filters (GemFilter) choose the prompt tokens before the model runs on them.
        input_ids, attention_mask, question_ids = select(
            model, input_ids, attention_mask, question_ids, cache
        )
    if question_ids is None:
        logits = prefill(model, input_ids, cache, attention_mask=attention_mask, chunk=chunk)
    elif policy.query_aware:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        ids = torch.cat([input_ids, question_ids], dim=1)
        full = torch.cat([mask, torch.ones_like(question_ids)], dim=1)
        logits = prefill(model, ids, cache, attention_mask=full, chunk=chunk)
    else:
        prefill(model, input_ids, cache, attention_mask=attention_mask, chunk=chunk)
        cache.freeze()
        logits = prefill(model, question_ids, cache)
    if not cache.frozen:
        cache.freeze()
    return logits


@torch.no_grad()
def decode_step(model: Any, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) after the cache; returns the next logits (B, V).

    Without autograd: a decoding step that records a graph keeps every step's intermediates
    (attention inputs included, O(context) each) alive through the cache's tensors, which is
    what inflated the decoding memory of benchmarks that called this outside ``generate``.
    """
    if "mask" not in cache.state:  # was a bare KeyError
        raise ValueError("decode_step needs a prefilled cache: call prefill or run_prompt first")
    mask = torch.cat([cache.state["mask"], torch.ones_like(cache.state["mask"][:, :1])], dim=1)
    res = model(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=cache.seen.to(tokens.device)[:, None],
        use_cache=True,
        **{_cache_kwarg(model): cache},
    )
    cache.state["mask"] = mask
    return res.logits[:, -1]


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    attention_mask: torch.Tensor | None = None,
    question_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Greedy decoding after a (chunked) prefill. Returns the new tokens (B, max_new_tokens).

    input_ids: (B, T) the context (left-padded with ``attention_mask``); question_ids: (B, Tq)
    without padding, or None. Without ``policy.query_aware`` the context is compressed and the
    cache frozen before the question is appended; with it, context and question are prefilled
    (and compressed) together. Rows that emitted ``eos_token_id`` keep emitting it.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    _check_ids("input_ids", input_ids, attention_mask)
    if question_ids is not None:
        _check_ids("question_ids", question_ids, None)
        if question_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"question_ids batch {question_ids.shape[0]} differs from input_ids batch "
                f"{input_ids.shape[0]}"
            )
    logits = run_prompt(model, input_ids, cache, attention_mask=attention_mask, question_ids=question_ids,
                        chunk=chunk)
    return greedy(model, cache, logits, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


@torch.no_grad()
def greedy(
    model: Any,
    cache: KVCache,
    logits: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
) -> torch.Tensor:
    """Greedy decoding from the last prompt logits (B, V). Returns (B, max_new_tokens)."""
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    b = logits.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    # The eos token each finished row emitted: it keeps emitting that one. (Filling with one eos
    # of a set made a row that stopped on another eos switch tokens.)
    stop = torch.zeros(b, dtype=torch.long, device=logits.device)
    out = []
    for step in range(max_new_tokens):
        nxt = logits.argmax(dim=-1)  # (B,)
        if eos:
            nxt = torch.where(done, stop, nxt)
            done = done | torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
            stop = torch.where(done, nxt, stop)
        out.append(nxt)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = decode_step(model, cache, nxt)
    tokens = torch.stack(out, dim=1)
    if tokens.shape[1] < max_new_tokens:  # every row is done: each repeats its own eos
        tokens = torch.cat([tokens, stop[:, None].expand(b, max_new_tokens - tokens.shape[1])], dim=1)
    return tokens


@torch.no_grad()
def answer_logprob(
    model: Any,
    input_ids: torch.Tensor,
    cache: KVCache,
    answer_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    question_ids: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Teacher-forced log-likelihood of ``answer_ids`` (B, Ta) after the prompt: (B,) float64.

    The prompt runs as in ``generate``; answer tokens are fed one at a time, as decoding would
    (so policies that evict while decoding do so between them).
    """
    _check_ids("answer_ids", answer_ids, None)
    logits = run_prompt(model, input_ids, cache, attention_mask=attention_mask, question_ids=question_ids,
                        chunk=chunk)
    return teacher_force(model, cache, logits, answer_ids)


@torch.no_grad()
def teacher_force(model: Any, cache: KVCache, logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Sum of log p(answer_ids) (B, Ta) from the last prompt logits (B, V): (B,) float64."""
    total = torch.zeros(answer_ids.shape[0], dtype=torch.float64, device=answer_ids.device)
    for i in range(answer_ids.shape[1]):
        logp = torch.log_softmax(logits.double(), dim=-1)
        total += logp.gather(1, answer_ids[:, i : i + 1].to(logp.device))[:, 0]
        if i + 1 < answer_ids.shape[1]:
            logits = decode_step(model, cache, answer_ids[:, i])
    return total
