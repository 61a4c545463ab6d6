"""The attention function that lets a Hugging Face model read a ragged ``KVCache``.

It is registered with transformers' public ``AttentionInterface`` under ``ATTN_NAME`` (and a mask
function under the same name with ``AttentionMaskInterface``), so a model whose
``config._attn_implementation`` is ``ATTN_NAME`` calls it from every attention layer.

The flow of one layer: the model rotates q and k, calls ``cache.update(k, v, layer_idx)``; our
cache layer parks the new keys and values and hands them back unchanged; the model then calls
this function with them. We find the cache layer that parked exactly these tensors and let it
store, attend (through ``memlab.ops.attention.decode`` over the ragged per-head caches) and
compress. When no ``KVCache`` layer parked the tensors (no cache, or a transformers
``DynamicCache``), the function computes plain causal attention with the padding mask, so the
model stays correct whatever cache it is given.

The mask function passes the 2D padding mask (B, columns) through unchanged: the cache stores no
padding, so it needs only to know which new columns are real tokens.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

ATTN_NAME = "memlab_kv"

# layer index -> the cache layer that parked keys for it in the running forward (per thread,
# so that two models generating in two threads never see each other's layers).
ACTIVE = threading.local()


def active_layers() -> dict[int, Any]:
    if not hasattr(ACTIVE, "layers"):
        ACTIVE.layers = {}
    return ACTIVE.layers


def padding_mask_passthrough(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """Mask function for ``ATTN_NAME``: the 2D (B, columns) bool padding mask, or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # a prepared 4D mask: the fallback path reads it as is
    return attention_mask.bool()


def dense_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float,
    window: int | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """Causal attention of T queries over S >= T keys, the queries being the last T.

    q: (B, H, T, D); k, v: (B, Hkv, S, D); key_valid: (B, S) bool or None (no padding).
    ``window``/``sinks``: a query at p sees keys in (p - window, p] and keys < sinks (StreamingLLM
    attention, positions counted in columns). Returns (B, T, H, D). A padded query sees only
    itself, which keeps its output finite.
    """
    b, h, t, d = q.shape
    s, hkv = k.shape[2], k.shape[1]
    if hkv != h:
        # repeat_interleave instead of SDPA's enable_gqa: the CPU math path of some torch
        # versions rejects enable_gqa with an explicit mask.
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    if key_valid is None or bool(key_valid.all()):
        if s == t and window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            return o.transpose(1, 2)
        key_valid = None
    qpos = torch.arange(s - t, s, device=q.device)[:, None]
    kpos = torch.arange(s, device=q.device)[None, :]
    allowed = (kpos <= qpos)[None, None]  # (1, 1, T, S)
    if window is not None:
        allowed = allowed & ((kpos > qpos - window) | (kpos < sinks))[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
        allowed = allowed | (kpos == qpos)[None, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return o.transpose(1, 2)


def kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query: (B, H, Tq, D); key, value: (B, Hkv, S, D).

    Returns ((B, Tq, H, D), None).
    """
    # Logit soft-capping (Gemma 2) and learned sinks (gpt-oss) change the softmax; neither the
    # ragged kernel nor the fallback implements them, and ignoring them gave other outputs.
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{ATTN_NAME} attention does not implement {name}={kwargs[name]!r} (got it from "
                f"{type(module).__name__}); expected a model with plain softmax attention"
            )
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer = active_layers().get(getattr(module, "layer_idx", -1))
    if layer is not None and layer.owns(key):
        mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return layer.attend(query, mask2d, scale), None
    # Fallback: no KVCache layer parked these keys (no cache, or another cache class).
    key_valid = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            key_valid = attention_mask[:, -key.shape[2] :].bool()
        else:
            raise ValueError(
                f"{ATTN_NAME} attention expects a 2D padding mask, got shape {tuple(attention_mask.shape)}"
            )
    return dense_causal(query, key, value, key_valid, scale), None


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kv_attention)
    AttentionMaskInterface.register(ATTN_NAME, padding_mask_passthrough)


register()
