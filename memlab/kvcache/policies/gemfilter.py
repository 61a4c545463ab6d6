"""``gemfilter``: GemFilter (Shi et al. 2024): early layers select the input tokens.

1. Filter pass: the model runs on the whole input up to ``filter_layer`` only (the layers above
   are skipped); at that layer, the attention of the last query over the input, summed over the
   query heads, ranks the tokens.
2. The ``budget`` highest-ranked tokens, in their original order, form a new, shorter input.
3. The full model runs on that input from scratch (fresh positions) and generates; its cache
   holds the selected tokens only.
Query-aware, the question is part of the filtered input and its last token is the query;
query-agnostic, the context is filtered with its own last token and the question is appended
unfiltered. ``memlab.kvcache.generate`` / ``answer_logprob`` call ``select_input``; plain
``model.generate`` cannot re-run a prompt, so this policy needs the memlab helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memlab.kvcache.policies.base import Observation, Policy, register
from memlab.kvcache.policies.full import Full

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache


class _StopFilterPass(Exception):
    """Raised at the filter layer to skip the layers above it."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__("gemfilter filter pass done")
        self.scores = scores  # (B, S) attention of the last query per stored row


@dataclass(kw_only=True)
class _FilterProbe(Full):
    """Full cache that scores rows at ``layer`` with the last query, then stops the forward."""

    layer: int = 0

    def query_window(self) -> int:
        return 1

    def after_layer(self, cache: KVCache, layer: int, phase: str) -> None:
        if layer != self.layer:
            return
        lay = cache.layers[layer]
        # The model's own softmax scale, recorded by ``attend`` (not head_dim ** -0.5, which
        # ranked tokens by another attention than the model's, e.g. for Granite).
        scale = lay.scale
        b = lay.batch_size
        total = None
        for g in lay.groups:
            probs = lay.observation(g, scale, phase).window_probs()  # (B, G, R, 1, S)
            per_row = probs[:, :, :, -1].sum(dim=(1, 2))  # (B, S), summed over query heads
            total = per_row if total is None else total + per_row
        raise _StopFilterPass(total if total is not None else torch.zeros(b, 0))


@register("gemfilter")
@dataclass(kw_only=True)
class GemFilter(Policy):
    """``tokens``/``ratio``: input tokens kept; ``filter_layer`` (default 13/32 of the depth)."""

    filter_layer: int | None = None

    def __post_init__(self) -> None:
        f = self.filter_layer
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
            raise ValueError(f"policy 'gemfilter': filter_layer={self.filter_layer!r} must be an int >= 0")
        super().__post_init__()

    def protected(self) -> int:
        return 1

    def group_budget(
        self, layer: int, n_layers: int, group: int, seen: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        return None  # the selection happened on the input; the cache keeps what it is given

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.positions.float()

    def after_layer(self, cache: KVCache, layer: int, phase: str) -> None:
        if phase == "prefill" and "gemfilter_columns" not in cache.state:
            # Plain model.generate would silently run the whole prompt with a full cache.
            raise ValueError(
                "policy 'gemfilter' selects the input tokens before the model runs; use "
                "memlab.kvcache.generate / answer_logprob, not model.generate"
            )

    def layer_of(self, n_layers: int) -> int:
        layer = self.filter_layer if self.filter_layer is not None else (13 * n_layers) // 32
        if not 0 <= layer < n_layers:
            raise ValueError(f"policy 'gemfilter': filter_layer={layer} out of range for {n_layers} layers")
        return layer

    @torch.no_grad()
    def rank_tokens(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Filter pass: (B, T) scores of the input tokens (-inf on padding)."""
        from memlab.kvcache.cache import KVCache
        from memlab.kvcache.generate import prefill

        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        probe = KVCache(model.config, policy=_FilterProbe(layer=self.layer_of(n_layers)))
        try:
            prefill(model, input_ids, probe, attention_mask=attention_mask)
        except _StopFilterPass as stop:
            per_row = stop.scores
        else:
            raise RuntimeError("gemfilter filter pass did not reach its filter layer")
        b, t = input_ids.shape
        mask = attention_mask.bool() if attention_mask is not None else torch.ones(b, t, dtype=torch.bool)
        mask = mask.to(per_row.device)
        scores = torch.full((b, t), float("-inf"), device=per_row.device)
        for i in range(b):
            # Rows are the sequence's real tokens in order: scatter them back to their columns.
            cols = mask[i].nonzero().flatten()
            scores[i, cols] = per_row[i, : len(cols)].float()
        return scores

    def select_input(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        question_ids: torch.Tensor | None,
        cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return the selected input (left-padded), its mask and the question to append (or None)."""
        ids, mask = input_ids, attention_mask
        if question_ids is not None and self.query_aware:
            mask = mask if mask is not None else torch.ones_like(ids)
            ids = torch.cat([ids, question_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(question_ids)], dim=1)
            question_ids = None
        scores = self.rank_tokens(model, ids, mask)
        b, t = ids.shape
        real = (mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)).to(scores.device)
        n_real = real.sum(dim=1)
        keep_n = self.budget(n_real)  # (B,)
        scores[:, -1] = torch.where(real[:, -1], torch.full_like(scores[:, -1], float("inf")), scores[:, -1])
        k = int(keep_n.max())
        top = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, k) columns in order
        out = torch.zeros(b, k, dtype=ids.dtype, device=ids.device)
        out_mask = torch.zeros(b, k, dtype=torch.long, device=ids.device)
        columns = torch.full((b, k), -1, dtype=torch.long)
        for i in range(b):
            cols = scores[i].topk(int(keep_n[i])).indices.sort().values if keep_n[i] < k else top[i]
            n = len(cols)
            out[i, k - n :] = ids[i, cols.to(ids.device)]
            out_mask[i, k - n :] = 1
            columns[i, k - n :] = cols.cpu()
        # Which input columns were kept (-1 for padding), for reports and tests.
        cache.state["gemfilter_columns"] = columns
        cache.state["filtered_columns"] = t - k
        return out, (out_mask if bool((out_mask == 0).any()) else None), question_ids
