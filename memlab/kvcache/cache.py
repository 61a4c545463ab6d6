"""``KVCache``: a transformers ``Cache`` that stores ragged per-(batch, KV head) keys and values.

Usage::

    cache = KVCache(model.config, policy=policies.build("snapkv", ratio=0.25))
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=32)
    cache.nbytes()  # bytes of keys and values actually held

Storage. Each layer holds one or more head groups (a policy may give heads different budgets,
DuoAttention does); a group stores keys and values as (B, S, G, D) tensors with a length per
(batch, head): rows 0..L-1 are in use. S is the longest (batch, head) of the group, so memory is
freed whenever budgets shrink, and it is freed per head when heads are put in separate groups.
Keys are stored rotated at their original positions, so dropping rows never changes the
positions of the rows that stay; new tokens get positions that continue the count of tokens
seen (``get_seq_length`` reports that count, not the number of rows held).

Padding. Left-padded batches work: padded columns are never stored, so a padded sequence simply
holds fewer rows, and attention runs over each (batch, head)'s own rows.

Phases. A forward with more than one new token before ``freeze()`` is a prefill chunk: the
layer stores the chunk, attends, and compresses to the budget of the tokens seen so far (so
peak memory follows the budget when the prompt comes in chunks). The first single-token
forward freezes the cache: from then on the budget is the one of the prompt, and a policy with
``compress_decoding`` evicts as tokens arrive; others let the cache grow.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memlab.kvcache.attention import ATTN_NAME, active_layers, dense_causal
from memlab.kvcache.head_group import HeadGroup, select_rows, stack_heads
from memlab.kvcache.policies import Full, Observation, Policy


def ragged_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """Attention of new queries over ragged caches through ``memlab.ops.attention.decode``.

    q: (B, Tq, H, D); k, v: (B, S, Hkv, D); lengths: (B, Hkv). Returns (B, Tq, H, D). float64
    (used by the exactness tests) and head dims the kernel does not take go to its reference,
    which is the specification the kernel is tested against. ``window``/``sinks`` count rows:
    rows are kept in position order, so after eviction the first rows are the sinks and the
    last ones the most recent tokens.
    """
    from memlab.ops import attention as ops_attention

    if k.shape[1] == 0:
        return torch.zeros_like(q)
    if q.dtype == torch.float64 or q.shape[-1] not in ops_attention.HEAD_DIMS:
        return ops_attention.decode_reference(q, k, v, lengths, scale=scale, window=window, sinks=sinks)
    # Lengths are valid by construction; skipping the check avoids a device sync per layer.
    return ops_attention.decode(
        q, k, v, lengths.to(torch.int32), scale=scale, window=window, sinks=sinks, check_lengths=False
    )


# Query block of the dense first-chunk attention when it needs an explicit mask (streaming
# heads): bounds the (block, S) boolean and additive masks SDPA builds.
DENSE_QUERY_BLOCK = 512



class KVLayer(CacheLayerMixin):
    """One decoder layer's ragged cache (a transformers cache layer)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: KVCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.groups: list[HeadGroup] = []
        self.columns = 0  # columns of the input seen (padding included): what transformers counts
        self.seen: torch.Tensor | None = None  # (B,) real tokens seen
        self.qbuf: torch.Tensor | None = None  # (B, W, H, D) last queries
        self.qvalid: torch.Tensor | None = None  # (B, W) bool
        self.qpos: torch.Tensor | None = None  # (B, W) int64
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prefill_forwards = 0
        self.stored = False  # whether any token was stored (decides the dense first-chunk path)
        self.scale = 1.0
        # Rows read by decoding queries, summed over (batch, KV head) and steps, and the rows a
        # full cache would have held for the same reads (times R in ``attended``). Counted on the
        # host while the lengths are known there, else on the device: never a sync per step.
        self._reads_full = 0
        self._reads_full_dev: torch.Tensor | None = None
        self._reads_skipped_dev: torch.Tensor | None = None
        self._reads_per_head = 1  # R, query heads per KV head
        # group -> (the frozen_seen it was computed for, decoding budget, its host value or None)
        self._decode_budgets: dict[int, tuple[Any, torch.Tensor | None, int | None]] = {}

    # --- transformers cache-layer API -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        policy = self.cache.policy
        groups = policy.head_groups(self.layer_idx, hkv)
        flat = sorted(h for grp in groups for h in grp)
        if flat != list(range(hkv)):
            raise ValueError(
                f"policy {policy.name!r} head_groups for layer {self.layer_idx} must partition the "
                f"{hkv} KV heads, got {groups}"
            )
        self.groups = [HeadGroup(list(grp)) for grp in groups if grp]
        for grp in self.groups:
            grp.init(b, d, key_states.dtype, key_states.device, mass=policy.needs_mass)
        self.seen = torch.zeros(b, dtype=torch.int64, device=key_states.device)
        self.batch_size = b
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Park the new (rotated) keys and values for ``attend``; return them unchanged.

        key_states, value_states: (B, Hkv, T, D).
        """
        if self._pending is not None:
            raise RuntimeError(
                f"KVCache layer {self.layer_idx}: the previous keys were never attended. The model must "
                f"use the {ATTN_NAME!r} attention implementation (KVCache(model.config, ...) sets it)."
            )
        window = self.cache.sliding_window
        if window is not None and self.columns + key_states.shape[2] > window:
            raise ValueError(
                f"KVCache: the model's config.sliding_window={window} restricts attention to the last "
                f"{window} tokens, which KVCache does not implement; this forward would hold "
                f"{self.columns + key_states.shape[2]} columns. Use contexts of at most {window} tokens or a "
                "model config with sliding_window=None"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size:
            raise ValueError(
                f"KVCache layer {self.layer_idx}: batch size {key_states.shape[0]} differs from the "
                f"cached batch size {self.batch_size}"
            )
        self._pending = (key_states, value_states)
        active_layers()[self.layer_idx] = self
        return key_states, value_states

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        # transformers 5.x passes either the query length or a cache_position tensor.
        arg = args[0] if args else next(iter(kwargs.values()), 0)
        q = arg.shape[0] if isinstance(arg, torch.Tensor) else int(arg)
        return self.columns + q, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.2x
        return -1

    def reset(self) -> None:
        self.groups = []
        self.columns = 0
        self.stored = False
        self.seen = None
        self.qbuf = self.qvalid = self.qpos = None
        self._pending = None
        self._decode_budgets = {}
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a compressed KVCache cannot be cropped: evicted tokens are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        indices = torch.as_tensor(indices, device=self.device)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        for grp in self.groups:
            grp.select_batch(indices)
        self._decode_budgets = {}
        self.seen = self.seen.index_select(0, indices)
        for name in ("qbuf", "qvalid", "qpos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, indices))
        self.batch_size = int(indices.numel())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        index = torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats)
        self.batch_select_indices(index)

    def offload(self) -> None:
        raise ValueError("KVCache does not support offloading")

    def prefetch(self) -> None:
        raise ValueError("KVCache does not support offloading")

    # --- memlab -------------------------------------------------------------------------------
    def owns(self, key: torch.Tensor) -> bool:
        return self._pending is not None and self._pending[0] is key

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def metadata_nbytes(self) -> int:
        out = sum(g.metadata_nbytes() for g in self.groups)
        for t in (self.qbuf, self.qvalid, self.qpos):
            if t is not None:
                out += t.numel() * t.element_size()
        return out

    def head_lengths(self) -> torch.Tensor:
        """(B, Hkv) int64 rows held per (batch, KV head)."""
        out = torch.zeros(self.batch_size, sum(len(g.heads) for g in self.groups), dtype=torch.int64)
        for g in self.groups:
            out[:, g.heads] = g.lengths.cpu()
        return out

    def observation(
        self, g: HeadGroup, scale: float, phase: str, budget: torch.Tensor | None = None
    ) -> Observation:
        queries = None
        if self.qbuf is not None:
            queries = g.take(self.qbuf, per_head=self.qbuf.shape[2] // self.cache.n_kv_heads)
        return Observation(
            layer=self.layer_idx,
            n_layers=self.cache.n_layers,
            heads=g.heads,
            keys=g.keys,
            values=g.values,
            positions=g.positions,
            lengths=g.lengths,
            seen=self.seen,
            queries=queries,
            query_valid=self.qvalid,
            query_positions=self.qpos,
            mass=g.mass,
            scale=scale,
            phase=phase,
            budget=budget,
        )

    def attend(self, query: torch.Tensor, mask2d: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Store the parked tokens, attend over the ragged cache, compress. Returns (B, Tq, H, D).

        query: (B, H, Tq, D) rotated; mask2d: (B, columns) bool padding mask or None.
        """
        k_new, v_new = self._pending
        self._pending = None
        b, h, tq, d = query.shape
        hkv = k_new.shape[1]
        cache = self.cache
        # A one-column prefill chunk (chunk=1, or a remainder of 1 before chunks that end at the
        # last column) may be padding: only decoding steps skip reading the mask. (Reading it only
        # for tq > 1 stored such a pad as a real token, or raised "left padding only".)
        if mask2d is not None and (tq > 1 or not cache.frozen):
            valid = mask2d[:, -tq:].to(device=query.device, dtype=torch.bool)
            if valid.shape != (b, tq):
                raise ValueError(f"attention_mask has shape {tuple(mask2d.shape)}, expected (B={b}, >= {tq})")
            # Left padding only: within the new columns no real token precedes a pad, and a
            # sequence that already holds tokens gets no more pads.
            bad = (valid[:, 1:] < valid[:, :-1]).any(1) | ((self.seen > 0) & ~valid.all(1))
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(
                    "KVCache supports left padding only (pads before the first real token); "
                    f"attention_mask row {row} has new columns {valid[row].long().tolist()} after "
                    f"{int(self.seen[row])} real tokens"
                )
        else:
            # A single new column while decoding is a real token: left padding puts pads only
            # before the first one. Not reading the mask here saves a device sync per layer and decoding step.
            # None stands for "every new token is real" (no (B, Tq) ones tensor to build).
            valid = None
        phase = "decode" if cache.frozen else "prefill"
        # (B, Tq) original positions: the real tokens seen before each new one.
        if valid is not None:
            pos = self.seen[:, None] + valid.long().cumsum(dim=1) - 1
        elif tq == 1:
            pos = self.seen[:, None]
        else:
            pos = self.seen[:, None] + torch.arange(tq, device=self.seen.device)
        was_empty = not self.stored
        q = query.transpose(1, 2)  # (B, Tq, H, D)
        kt = k_new.transpose(1, 2)  # (B, Tq, Hkv, D)
        vt = v_new.transpose(1, 2)
        for g in self.groups:
            g.append(g.take(kt), g.take(vt), pos, valid)
        self.seen = self.seen + (tq if valid is None else valid.sum(dim=1))
        self.columns += tq
        self.stored = self.stored or valid is None or bool(valid.any())
        self.scale = scale
        if phase == "prefill":
            self.prefill_forwards += 1

        policy = cache.policy
        windows = [policy.attention_window(self.layer_idx, gi) for gi in range(len(self.groups))]
        if was_empty and all(w is None for w in windows):
            # First tokens of this layer: nothing is cached yet, so dense causal attention over
            # the chunk (SDPA, flash on GPU) is exact and faster than the ragged kernel.
            out = dense_causal(query, k_new, v_new, valid, scale)
        elif was_empty:
            out = torch.empty_like(q)
            r = h // hkv
            for gi, g in enumerate(self.groups):
                win, snk = windows[gi] if windows[gi] is not None else (None, 0)
                # (B, heads, Tq, D) views of this group's heads, as dense_causal takes them
                qg = g.take(q, per_head=r).transpose(1, 2)
                kg, vg = g.take(kt).transpose(1, 2), g.take(vt).transpose(1, 2)
                # A window needs an explicit (T, S) mask: queries go in blocks, each over the
                # keys up to its last query, so the mask stays (block, S) (same result per query).
                block = tq if win is None else DENSE_QUERY_BLOCK
                for start in range(0, tq, block):
                    end = min(start + block, tq)
                    g.put(out[:, start:end], dense_causal(
                        qg[:, :, start:end], kg[:, :, :end], vg[:, :, :end],
                        None if valid is None else valid[:, :end], scale, window=win, sinks=snk,
                    ), per_head=r)
        else:
            r = h // hkv
            # One group (the common case) attends with all heads at once: no output to scatter.
            out = None if len(self.groups) == 1 else torch.empty_like(q)
            for gi, g in enumerate(self.groups):
                q_g = g.take(q, per_head=r)
                rows = policy.attention_rows(cache, self, gi, q_g, scale, phase)
                if rows is None:
                    k_g, v_g, len_g = g.keys, g.values, g.lengths
                else:
                    idx, len_g = rows
                    idx4 = idx[..., None].expand(*idx.shape, d)
                    k_g, v_g = g.keys.gather(1, idx4), g.values.gather(1, idx4)
                win, snk = windows[gi] if windows[gi] is not None else (None, 0)
                o_g = ragged_decode(q_g, k_g, v_g, len_g, scale, window=win, sinks=snk)
                if out is None:
                    out = o_g
                else:
                    g.put(out, o_g, per_head=r)
                if tq == 1 and phase == "decode":  # not a one-column prefill chunk
                    self._count_reads(g, None if rows is None else len_g, r)
        if (policy.needs_mass or policy.query_window() > 0) and valid is None:
            valid = torch.ones(b, tq, dtype=torch.bool, device=query.device)
        if policy.needs_mass:
            self._accumulate_mass(q, pos, valid, scale)
        window = policy.query_window()
        if window > 0:
            self._remember_queries(q, pos, valid, window)
        self.compress(scale, phase)
        policy.after_layer(cache, self.layer_idx, phase)
        return out

    def _count_reads(self, g: HeadGroup, read: torch.Tensor | None, r: int) -> None:
        """Count a decoding step's reads of group ``g``: ``read`` (B, G) rows, None for all held."""
        self._reads_per_head = r
        if g.uniform is not None:
            self._reads_full += g.uniform * g.lengths.numel()
        else:
            n = g.lengths.sum()
            self._reads_full_dev = n if self._reads_full_dev is None else self._reads_full_dev + n
        if read is not None:
            n = g.lengths.sum() - read.sum()
            self._reads_skipped_dev = n if self._reads_skipped_dev is None else self._reads_skipped_dev + n

    @property
    def attended_full(self) -> int:
        """Rows a full cache would have held for the decoding reads, over (batch, query head) and steps."""
        dev = 0 if self._reads_full_dev is None else int(self._reads_full_dev)
        return (self._reads_full + dev) * self._reads_per_head

    @property
    def attended(self) -> int:
        """Rows read by decoding queries, summed over (batch, query head) and steps."""
        dev = 0 if self._reads_skipped_dev is None else int(self._reads_skipped_dev)
        return self.attended_full - dev * self._reads_per_head

    def _remember_queries(self, q: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, window: int) -> None:
        """Keep the last ``window`` queries (left padding keeps real tokens at the right)."""
        if self.qbuf is None:
            self.qbuf, self.qvalid, self.qpos = q[:, -window:], valid[:, -window:], pos[:, -window:]
        else:
            self.qbuf = torch.cat([self.qbuf, q], dim=1)[:, -window:]
            self.qvalid = torch.cat([self.qvalid, valid], dim=1)[:, -window:]
            self.qpos = torch.cat([self.qpos, pos], dim=1)[:, -window:]
        self.qbuf = self.qbuf.contiguous()

    def _accumulate_mass(self, q: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, scale: float) -> None:
        """Add each new query's attention probabilities to the rows it reads (H2O's statistic).

        q: (B, Tq, H, D); pos, valid: (B, Tq). Queries go in blocks, and KV heads a few at a time,
        to bound the (heads, R, block, S) scores to (R, block, S) per block: a prompt chunk takes
        one KV head at a time, a decoding step (one query) all heads of a group at once. The
        logits are scaled and masked in place, so one float32 buffer lives besides the softmax.
        """
        tq, h = q.shape[1], q.shape[2]
        r = h // self.cache.n_kv_heads
        block = 256
        for g in self.groups:
            rowvalid = (torch.arange(g.rows, device=q.device)[None, :, None] < g.lengths[:, None, :])
            n = len(g.heads)
            step = min(n, max(1, block // tq))  # KV heads per pass
            qg = g.take(q, per_head=r)  # (B, Tq, G * R, D)
            for j in range(0, n, step):
                js = slice(j, j + step)
                kf = g.keys[:, :, js].float().permute(0, 2, 3, 1)[:, :, None]  # (B, n, 1, D, S)
                kpos = g.positions[:, :, js].permute(0, 2, 1)[:, :, None, None, :]  # (B, n, 1, 1, S)
                rv = rowvalid[:, :, js].permute(0, 2, 1)[:, :, None, None, :]  # (B, n, 1, 1, S)
                heads_q = qg[:, :, j * r : (j + step) * r]  # (B, Tq, n * R, D)
                for start in range(0, tq, block):
                    qs = heads_q[:, start : start + block].float().unflatten(2, (-1, r))  # (B, t, n, R, D)
                    qs = qs.permute(0, 2, 3, 1, 4)  # (B, n, R, t, D)
                    logits = torch.matmul(qs, kf).mul_(scale)  # (B, n, R, t, S)
                    qp = pos[:, start : start + block][:, None, None, :, None]
                    qv = valid[:, start : start + block][:, None, None, :, None]
                    hidden = ~(rv & (kpos <= qp) & qv)  # (B, n, 1, t, S)
                    probs = torch.softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
                    del logits, hidden
                    mass = probs.nan_to_num_(nan=0.0).sum(dim=(2, 3))  # (B, n, S)
                    g.mass[:, :, js] += mass.permute(0, 2, 1)
                    del probs

    def compress(self, scale: float, phase: str) -> None:
        """Evict rows above the budget of this phase (see the module docstring)."""
        cache = self.cache
        policy = cache.policy
        if phase == "decode" and not policy.compress_decoding:
            return
        for gi in range(len(self.groups)):
            if phase == "decode":
                budget, budget_host = self._decode_budget(gi)
            else:
                budget = policy.group_budget(self.layer_idx, cache.n_layers, gi, self.seen, cache)
                budget_host = None
            if budget is None:
                continue
            if phase == "decode":
                policy.refill(cache, self, gi)
            self.shrink(gi, budget, scale, phase, budget_host)

    def _decode_budget(self, gi: int) -> tuple[torch.Tensor | None, int | None]:
        """Head group ``gi``'s decoding budget and, when all its entries are equal, their value.

        The decoding budget is the one of the frozen prompt, so it is computed (and read on the
        host, one sync) once per frozen prompt rather than at every step.
        """
        cache = self.cache
        memo = self._decode_budgets.get(gi)
        if memo is not None and memo[0] is cache.frozen_seen:
            return memo[1], memo[2]
        budget = cache.policy.group_budget(self.layer_idx, cache.n_layers, gi, cache.frozen_seen, cache)
        host = None
        if budget is not None:
            budget = budget.to(device=self.groups[gi].lengths.device, dtype=torch.int64)
            first = budget.flatten()[:1]
            if first.numel() and bool((budget == first).all()):
                host = int(first)
        self._decode_budgets[gi] = (cache.frozen_seen, budget, host)
        return budget, host

    def shrink(
        self, gi: int, budget: torch.Tensor, scale: float, phase: str, budget_host: int | None = None
    ) -> None:
        """Evict rows of head group ``gi`` down to ``budget`` ((B,) or (B, G) int64) by score.

        ``budget_host``: the value of every entry of ``budget``, when they are equal and known on
        the host; with equal lengths known there too, deciding what to evict needs no sync.
        """
        g = self.groups[gi]
        budget = budget.to(device=g.lengths.device, dtype=torch.int64)
        bud = budget if budget.dim() == 2 else budget[:, None].expand_as(g.lengths)
        kept_host = None
        if g.uniform is not None and budget_host is not None:
            if g.uniform <= budget_host:
                return
            kept_host = budget_host  # every (batch, head) holds more than the budget
        elif not bool((g.lengths > bud).any()):
            return
        obs = self.observation(g, scale, phase, torch.minimum(bud, g.lengths))
        policy = self.cache.policy
        scores = policy.score(obs)
        if scores.shape != g.positions.shape:
            raise ValueError(
                f"policy {policy.name!r} returned scores of shape {tuple(scores.shape)}, "
                f"expected {tuple(g.positions.shape)}"
            )
        valid = obs.valid
        idx, kept = select_rows(scores, valid, budget, kept_max=kept_host)
        if type(policy).on_evict is not Policy.on_evict:
            # Only policies that look at evicted rows (ALISA) pay for finding them.
            in_use = torch.arange(idx.shape[1], device=idx.device)[None, :, None] < kept[:, None, :]
            kept_rows = torch.zeros_like(valid).scatter_(1, idx, in_use)
            policy.on_evict(self.cache, self.layer_idx, gi, g, valid & ~kept_rows, scores, kept_host)
        g.keep(idx, kept, uniform=kept_host)


class KVCache(Cache):
    """A transformers ``Cache`` whose layers keep what ``policy`` decides, in ragged storage.

    Creating it sets the model's attention implementation (``config._attn_implementation``) to
    ``memlab_kv``; that implementation falls back to plain causal attention when it is called
    without a ``KVCache``, so the model keeps working with other caches.
    """

    def __init__(
        self,
        config: Any,
        policy: Policy | None = None,
        *,
        prefill_chunk: int | None = None,
    ) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = getattr(text, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ValueError(
                "KVCache supports models whose layers all use full attention; got layer_types "
                f"{sorted(set(layer_types))}"
            )
        softcap = getattr(text, "attn_logit_softcapping", None)
        if softcap is not None:
            # Soft-capped attention logits (Gemma 2) are not implemented by the ragged attention.
            raise ValueError(
                f"KVCache does not support attention logit soft-capping: config.attn_logit_softcapping="
                f"{softcap!r}, expected None"
            )
        # A sliding window that every layer uses (Mistral's ``sliding_window``, with no
        # ``layer_types``): KVCache attends over everything it holds, so it equals the model only
        # while the context fits in the window. Past it, ``update`` raises instead of silently
        # computing something else (tokens beyond the window used to be attended).
        window = getattr(text, "sliding_window", None)
        uses_window = layer_types is None and getattr(text, "use_sliding_window", True) is not False
        self.sliding_window: int | None = int(window) if uses_window and window else None
        bad_chunk = isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1
        if prefill_chunk is not None and bad_chunk:
            raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(
                f"policy must be a memlab Policy (policies.build(...)), got {type(policy).__name__}"
            )
        self.policy: Policy = policy if policy is not None else Full()
        self.config = config
        self.n_layers = int(text.num_hidden_layers)
        self.n_heads = int(text.num_attention_heads)
        self.n_kv_heads = int(getattr(text, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // self.n_heads)
        self.prefill_chunk = prefill_chunk
        self.frozen = False
        self.frozen_seen: torch.Tensor | None = None
        self.state: dict[str, Any] = {}  # per-generation state that policies share across layers
        for cfg in {id(config): config, id(text): text}.values():
            if getattr(cfg, "_attn_implementation", None) != ATTN_NAME:
                cfg._attn_implementation = ATTN_NAME
        super().__init__(layers=[KVLayer(self, i) for i in range(self.n_layers)])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The first single-token forward ends the prompt: freeze the budget before any layer runs
        # (unless memlab's own prefill is feeding the prompt one token at a time).
        first_step = layer_idx == 0 and key_states.shape[2] == 1 and not self.frozen
        if first_step and self.layers[0].is_initialized and not self.state.get("prefilling"):
            self.freeze()
        return self.layers[layer_idx].update(key_states, value_states)

    # --- selecting rows of the batch (beam search's reorder, contrastive search, user code) ---
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` ((N,) int64, repeats allowed, or (B,) bool) of the batch: every
        layer's rows, the frozen prompt lengths, the padding mask and the policy's own state."""
        device = self.layers[0].device if self.layers[0].is_initialized else None
        indices = torch.as_tensor(indices, device=device)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        for layer in self.layers:
            layer.batch_select_indices(indices)
        if self.frozen_seen is not None:
            self.frozen_seen = self.frozen_seen.index_select(0, indices.to(self.frozen_seen.device))
        mask = self.state.get("mask")
        if mask is not None:
            self.state["mask"] = mask.index_select(0, indices.to(mask.device))
        self.policy.select_batch(self, indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.layers[0].is_initialized:
            return
        self.batch_select_indices(torch.arange(self.layers[0].batch_size).repeat_interleave(repeats))

    def freeze(self) -> None:
        """End the prompt: later tokens are appended (and evicted only with ``compress_decoding``)."""
        if not self.layers[0].is_initialized:
            raise ValueError("freeze() needs a prefilled cache")
        self.frozen = True
        self.frozen_seen = self.layers[0].seen.clone()

    def fork(self, policy: Policy) -> KVCache:
        """A new cache holding what ``policy`` keeps after the same one-shot prefill as this one.

        With one-shot prefill every layer attends over the whole prompt before it compresses, so
        a policy's result depends only on the full keys, values, last queries (and attention
        mass) that this cache recorded: ``Full(observe_window=W, observe_mass=True)`` records
        them, and forking replays each layer's compression, in layer order, on copies. Benchmarks
        use it to run many policies on one prefill. Policies that change the prefill itself
        (streaming attention, input filters) cannot be forked.
        """
        base = self.policy
        if not isinstance(base, Full) or self.frozen:
            raise ValueError("fork needs an unfrozen cache filled by the 'full' policy")
        lay0 = self.layers[0]
        if not lay0.is_initialized or lay0.prefill_forwards != 1:
            raise ValueError(f"fork needs a one-shot prefill, got {lay0.prefill_forwards} prefill forwards")
        if policy.query_window() > base.observe_window or (policy.needs_mass and not base.observe_mass):
            raise ValueError(
                f"policy {policy.name!r} needs {policy.query_window()} observed queries and mass="
                f"{policy.needs_mass}; this cache observed {base.observe_window} and mass={base.observe_mass}"
            )
        changes_prefill = getattr(policy, "select_input", None) is not None or any(
            policy.attention_window(i, g) is not None
            for i in range(self.n_layers)
            for g in range(len(policy.head_groups(i, self.n_kv_heads)))
        )
        if changes_prefill:
            raise ValueError(f"policy {policy.name!r} changes the prefill itself and cannot be forked")
        new = KVCache(self.config, policy=policy, prefill_chunk=self.prefill_chunk)
        for old, lay in zip(self.layers, new.layers, strict=True):
            full = {name: stack_heads(old.groups, name) for name in ("keys", "values", "positions", "mass")}
            lengths = stack_heads(old.groups, "lengths")
            lay.device, lay.dtype, lay.batch_size = old.device, old.dtype, old.batch_size
            lay.seen, lay.columns, lay.scale = old.seen.clone(), old.columns, old.scale
            lay.prefill_forwards, lay.stored = old.prefill_forwards, old.stored
            window = policy.query_window()
            if window > 0:
                lay.qbuf, lay.qvalid, lay.qpos = (
                    t[:, -window:].clone() for t in (old.qbuf, old.qvalid, old.qpos)
                )
            for heads in policy.head_groups(lay.layer_idx, self.n_kv_heads):
                g = HeadGroup(list(heads))
                g.keys, g.values = full["keys"][:, :, heads].clone(), full["values"][:, :, heads].clone()
                g.positions, g.lengths = full["positions"][:, :, heads].clone(), lengths[:, heads].clone()
                if policy.needs_mass:
                    g.mass = full["mass"][:, :, heads].clone()
                lay.groups.append(g)
            lay.is_initialized = True
        for lay in new.layers:
            lay.compress(lay.scale, "prefill")
            policy.after_layer(new, lay.layer_idx, "prefill")
        if "mask" in self.state:
            new.state["mask"] = self.state["mask"].clone()
        return new

    @property
    def seen(self) -> torch.Tensor:
        """(B,) real tokens seen per sequence."""
        return self.layers[0].seen

    def nbytes(self) -> int:
        """Bytes of keys and values held (every stored row, padding rows included)."""
        return sum(layer.nbytes() for layer in self.layers)

    def metadata_nbytes(self) -> int:
        """Bytes of positions, lengths, statistics and observation queries held beside the KV."""
        return sum(layer.metadata_nbytes() for layer in self.layers)

    def held_nbytes(self) -> int:
        """Every byte the cache holds on purpose: keys and values, their metadata, what the
        policy keeps elsewhere (ALISA's host tier) and the attention mask of a padded batch.
        Decoding should keep nothing alive beyond this (benchmarks and tests check it)."""
        mask = self.state.get("mask")
        mask_bytes = 0 if mask is None else mask.numel() * mask.element_size()
        return self.nbytes() + self.metadata_nbytes() + self.policy.extra_nbytes(self, True) + mask_bytes

    def full_nbytes(self) -> int:
        """Bytes a transformers DynamicCache would hold for the same columns and batch."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return 0
        elt = torch.empty((), dtype=layer.dtype).element_size()
        # Input filters (GemFilter) drop prompt columns before the model sees them; the full
        # cache they are compared with holds those columns too.
        columns = layer.columns + self.state.get("filtered_columns", 0)
        return 2 * self.n_layers * layer.batch_size * columns * self.n_kv_heads * self.head_dim * elt

    def kept_tokens(self) -> torch.Tensor:
        """(n_layers, B, Hkv) int64: rows held per layer, sequence and KV head."""
        return torch.stack([layer.head_lengths() for layer in self.layers])

    def attended_ratio(self) -> float:
        """Rows read by decoding queries over the rows held: < 1 only for sparse-attention policies."""
        full = sum(layer.attended_full for layer in self.layers)
        return sum(layer.attended for layer in self.layers) / full if full else 1.0

    def summary(self) -> dict[str, Any]:
        return {
            **self.policy.describe(),
            "kv_bytes": self.nbytes(),
            "kv_metadata_bytes": self.metadata_nbytes(),
            "full_kv_bytes": self.full_nbytes(),
            "attended_ratio": self.attended_ratio(),
        }
