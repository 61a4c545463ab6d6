"""Landmark Attention (Mohtashami & Jaggi, 2023): a landmark per block gates access to the block.

The sequence is cut into blocks of ``block_size`` tokens on an absolute grid (block c holds
positions [c * block_size, (c + 1) * block_size)). After each complete block a landmark token
enters the key stream and stands for the block. For a query i in block b:

- the tokens of its own block (up to i) are attended directly;
- a past block c < b is reached only through its landmark: the landmark keys of the past
  blocks compete in one softmax with the current block's tokens (the paper's grouped softmax),
  and the weight a landmark receives is shared out over its block's tokens by a softmax within
  that block. With s_ij = q_i . k_j / sqrt(D) and l_ic = q_i . k_L(c) / sqrt(D)::

      Z_i = sum_{j in b, j <= i} exp(s_ij) + sum_{c < b} exp(l_ic)
      w_ij = exp(s_ij) / Z_i                                          (j in block b)
      w_ij = exp(l_ic) / Z_i * exp(s_ij) / sum_{j' in c} exp(s_ij')    (j in block c < b)

  The weights sum to one and landmark values are never read (the paper's AttWeight = 0 for
  landmarks). This is ordinary softmax attention over the logits s_ij + l_ic - LSE_c(s_i.),
  which is how ``_attend_dense`` computes it.

Modes (the same rule drives the full forward, chunked calls and decoding, so all three agree):

- ``mode="grouped"`` (default, the training form): every past block takes part.
- ``mode="topk"`` (the paper's inference with a KV cache): each query, per head, keeps only the
  ``top_k`` past blocks of highest landmark score l_ic and runs the grouped softmax over those
  blocks plus its own block. ``_attend_topk`` gathers just those blocks from the cache, so a
  decoding step reads the landmark keys, top_k * block_size retrieved tokens and the current
  block. A query with fewer than ``top_k`` past blocks (the start of a sequence) takes them
  all; ``top_k`` larger than ``memory_blocks`` (the number of blocks the cache keeps) is a
  configuration error. ``stats`` counts what was read; ``last_retrieved`` holds the blocks.

The landmark key. In the paper the landmark is a vocabulary token whose key at layer l comes
from its hidden state, which earlier layers filled by attending to its block. A mixer sees only
the real tokens, so the landmark is built here in one step: its learned embedding e gives a
query q_L = W_q e and key W_k e (rotated to the block's last position), q_L attends over the
block's keys, and the landmark key is W_k e plus that attention read of the block's keys:
k_L(c) = R(W_k e) + sum_j softmax_j(R(q_L) . k_j / sqrt(D)) k_j. A query's landmark score is
then its learned bias towards landmarks plus an attention-weighted mean of its scores with the
block's tokens: a high score to any token inside the block raises the block's landmark score.

Positions in "topk" mode (``position_mapping``). With ``"exact"`` every key keeps its true
position, so a query reaching a block far back sees a relative distance never met in training.
``"stingy"`` is the paper's stingy position mapping (Mohtashami & Jaggi 2023, positional encoding; the
rule below is the one in the authors' inference code, epfml/landmark-attention
``models/caches/mem_cache.py`` and ``llama/llama_mem.py``), adapted to this module, where a
query's local context is its own block b and every earlier block is reached through retrieval.
A prefix of k + 1 block slots, blocks b-k-1 .. b-1 (k = ``top_k``), sits just before block b,
and the query and its own block keep their true positions:

- landmark scoring (block selection): the latest k blocks b-k .. b-1 keep their true slots;
  every older block is scored as if it sat in the first slot, block b-k-1. A past block c is
  placed at block max(c, b-k-1).
- attention over the retrieved blocks: the q retrieved blocks (q = min(top_k, past blocks)),
  sorted by block id, fill the prefix in that order; the r-th of them (r = 0 .. q-1) goes to
  block b - q - 1 + r, one slot later (b - q + r) if it is one of the latest k blocks. So the
  retrieved old blocks take the first slots, the retrieved recent ones the last slots; when the
  retrieved blocks are exactly the latest ones (always so at the start of a sequence) every
  position is true. Landmark and tokens of a block move together.

A query thus never sees a relative distance above (top_k + 2) * block_size - 1, however long
the sequence. A block moved by delta positions has its rotated keys (and its landmark key, an
attention read of those keys) rotated by a further delta; the module rotates the query by
-delta instead, which gives the same scores, so the cache keeps keys at their true positions
and forward, chunked calls and decoding still agree. ``last_mapped`` holds the block each
retrieved block was placed at. The mapping only acts in "topk" mode with rope; "grouped" (the
training form) always uses true positions.

State (grows with T): rotated keys and values of the cached tokens, the landmark keys of the
cached complete blocks, ``start`` (first cached position, a block boundary) and ``pos``.
With ``memory_blocks`` the cache keeps only the last ``memory_blocks`` complete blocks and the
full forward applies the same limit, so the state is bounded and forward == decode still holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.rope import rotary

MODES = ("grouped", "topk")
POSITION_MAPPINGS = ("exact", "stingy")
_QUERY_CHUNK = 256  # top-k mode gathers retrieved blocks for this many queries at a time


@dataclass(kw_only=True)
class LandmarkConfig(MixerConfig):
    n_heads: int = 4
    block_size: int = 50  # tokens per block; the paper's l_block
    top_k: int = 4  # blocks retrieved per query and head in "topk" mode; the paper's k
    mode: str = "grouped"  # "grouped" (every past block) or "topk" (retrieval)
    memory_blocks: int | None = None  # complete blocks kept in the cache; None keeps all
    # positions of retrieved blocks in "topk" mode: "exact" (true positions) or "stingy" (the
    # paper's bounded mapping for inference beyond the training length); ignored by "grouped"
    position_mapping: str = "exact"
    rope: bool = True
    rope_base: float = 10000.0
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n_heads", "block_size", "top_k")
        check_divides(self, "n_heads", "d_model")
        if self.mode not in MODES:
            raise ValueError(f"LandmarkConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.position_mapping not in POSITION_MAPPINGS:
            raise ValueError(
                f"LandmarkConfig.position_mapping must be one of {POSITION_MAPPINGS}, "
                f"got {self.position_mapping!r}"
            )
        if self.memory_blocks is not None:
            check_positive(self, "memory_blocks")
            if self.top_k > self.memory_blocks:
                raise ValueError(
                    f"LandmarkConfig.top_k={self.top_k} is above the number of blocks kept, "
                    f"memory_blocks={self.memory_blocks}"
                )
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"LandmarkConfig: rope needs an even head dim, got {self.d_model // self.n_heads}"
            )


def select_top_blocks(scores: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the k highest-scoring blocks among the valid ones.

    scores: (..., n) landmark scores; valid: (..., n) bool, broadcastable. Returns indices
    (..., k) and a bool (..., k) that is False where a query had fewer than k valid blocks.
    Raises ValueError when k is larger than the number of blocks n.
    """
    n = scores.shape[-1]
    if k > n:
        raise ValueError(f"top_k={k} is above the number of blocks {n}")
    masked = scores.masked_fill(~valid, float("-inf"))
    idx = masked.topk(k, dim=-1).indices
    ok = valid.expand_as(scores).gather(-1, idx)
    return idx, ok


def stingy_retrieved_blocks(
    q_block: torch.Tensor, blocks: torch.Tensor, ok: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Where the stingy mapping places each retrieved block (see the module docstring).

    q_block: (T,) block of each query; blocks: (..., T, k) absolute ids of the retrieved blocks
    in any order; ok: (..., T, k) bool, False for empty slots. Returns (..., T, k) absolute block
    ids of the slots they take: the r-th valid block in increasing id order, of q valid ones,
    goes to q_block - q - 1 + r, plus one when it is among the latest top_k blocks. Empty slots
    give -1.
    """
    before = (blocks[..., None, :] < blocks[..., :, None]) & ok[..., None, :]
    rank = before.sum(-1)  # how many valid retrieved blocks are older
    n_valid = ok.sum(-1, keepdim=True)
    qb = q_block[:, None]
    recent = blocks >= qb - top_k
    mapped = qb - n_valid - 1 + rank + recent.long()
    return torch.where(ok, mapped, -1)


@register("landmark")
class Landmark(Mixer):
    """Landmark attention: grouped softmax over landmark-gated blocks, top-k block retrieval."""

    Config = LandmarkConfig
    constant_state = False
    test_config = {"n_heads": 2, "block_size": 4, "top_k": 2}

    def __init__(self, config: LandmarkConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads = c.n_heads
        self.head_dim = c.d_model // c.n_heads
        self.qkv_proj = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        # the landmark token's input embedding; unit scale like the normalised token inputs
        self.landmark = nn.Parameter(torch.randn(c.d_model))
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the read counters (kept in eval mode only). Sums are over (batch, head, query)."""
        self.stats = {"queries": 0, "landmarks_scanned": 0, "retrieved_tokens": 0, "local_tokens": 0}
        self.last_retrieved: torch.Tensor | None = None
        self.last_mapped: torch.Tensor | None = None

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "lk": empty.clone(), "pos": 0, "start": 0}

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotary(x, positions, self.config.rope_base) if self.config.rope else x

    def _rotate_each(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate every vector of x: (..., D) by its own position, positions: x.shape[:-1]."""
        if not self.config.rope:
            return x
        d = x.shape[-1]
        return rotary(x.reshape(-1, d), positions.reshape(-1), self.config.rope_base).view(x.shape)

    @property
    def _stingy(self) -> bool:
        return self.config.position_mapping == "stingy" and self.config.rope

    def _stingy_gate(
        self, q: torch.Tensor, lk: torch.Tensor, gate: torch.Tensor, q_pos: torch.Tensor, first_block: int
    ) -> torch.Tensor:
        """Landmark scores with every block older than the latest top_k scored from the prefix's
        first slot, block anchor = q_block - top_k - 1. gate: (B, H, T, n) scores at true
        positions. With keys rotated at true positions, q . R(delta) lk_c = R(-anchor) q .
        R(-c) lk_c (rotations in units of block_size positions)."""
        bs, n = self.config.block_size, lk.shape[2]
        anchor = q_pos // bs - self.config.top_k - 1  # (T,)
        blocks = torch.arange(first_block, first_block + n, device=q.device)
        q_anchor = self._rotate(q, -anchor * bs)
        lk_free = self._rotate(lk, -blocks * bs)  # landmark keys moved to block 0
        gate_old = (q_anchor @ lk_free.transpose(-1, -2)) / math.sqrt(self.head_dim)
        return torch.where(blocks[None, :] < anchor[:, None], gate_old, gate)

    def project(self, x: torch.Tensor, pos0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, d_model) at positions pos0.. -> rotated q, k and v, each (B, H, T, D)."""
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        positions = torch.arange(pos0, pos0 + t, device=x.device)
        return self._rotate(q, positions), self._rotate(k, positions), v

    def landmark_keys(self, k_blocks: torch.Tensor, first_block: int) -> torch.Tensor:
        """Landmark keys of complete blocks.

        k_blocks: (B, H, n, block_size, D) rotated keys of blocks first_block .. first_block+n-1.
        Returns (B, H, n, D): R(W_k e) + sum_j softmax_j(R(W_q e) . k_j / sqrt(D)) k_j, with R the
        rotation to the block's last position.
        """
        b, h, n, bs, d = k_blocks.shape
        e = self.qkv_proj(self.landmark).view(3, h, 1, d)
        last = (torch.arange(first_block, first_block + n, device=k_blocks.device) + 1) * bs - 1
        q_l = self._rotate(e[0].expand(h, n, d).unsqueeze(0), last)  # (1, H, n, D)
        k_l = self._rotate(e[1].expand(h, n, d).unsqueeze(0), last)
        logits = torch.einsum("bhnd,bhnjd->bhnj", q_l.expand(b, h, n, d), k_blocks) / math.sqrt(d)
        alpha = torch.softmax(logits, -1)  # (B, H, n, block_size): the landmark's read of its block
        return k_l + torch.einsum("bhnj,bhnjd->bhnd", alpha, k_blocks)

    def _past_blocks(self, q_pos: torch.Tensor, first_block: int, n_blocks: int) -> torch.Tensor:
        """(T, n) bool: which cached blocks are past blocks a query may reach through landmarks."""
        bs = self.config.block_size
        blocks = torch.arange(first_block, first_block + n_blocks, device=q_pos.device)
        q_block = (q_pos // bs)[:, None]
        ok = blocks[None, :] < q_block
        if self.config.memory_blocks is not None:
            ok = ok & (blocks[None, :] >= q_block - self.config.memory_blocks)
        return ok

    def _attend_dense(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lk: torch.Tensor,
        q_pos: torch.Tensor,
        start: int,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Grouped-softmax attention of q over all cached keys, as one masked softmax.

        q: (B, H, T, D); k, v: (B, H, S, D) for positions start..; lk: (B, H, n, D) landmark keys of
        the n complete blocks at the head of the cache; select: optional (B, H, T, n) bool that
        restricts the past blocks (top-k retrieval). Returns (B, H, T, D).
        """
        bs, scale = self.config.block_size, 1.0 / math.sqrt(self.head_dim)
        n, s_len = lk.shape[2], k.shape[2]
        k_pos = start + torch.arange(s_len, device=q.device)
        local = ((k_pos // bs)[None, :] == (q_pos // bs)[:, None]) & (k_pos[None, :] <= q_pos[:, None])
        s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
        reachable = self._past_blocks(q_pos, start // bs, n)
        past_ok = reachable if select is None else reachable & select
        gate = (q @ lk.transpose(-1, -2)) * scale  # (B, H, T, n)
        s_past = s[..., : n * bs].unflatten(-1, (n, bs))
        past = s_past - torch.logsumexp(s_past, -1, keepdim=True) + gate[..., None]
        past = torch.where(past_ok[..., None], past, float("-inf")).flatten(-2)
        head = torch.where(local[:, : n * bs], s[..., : n * bs], past)
        tail = torch.where(local[:, n * bs :], s[..., n * bs :], float("-inf"))
        p = torch.softmax(torch.cat([head, tail], dim=-1), dim=-1)
        if not self.training:  # counting syncs with the device; training does not need it
            self._count(q, past_ok, local, landmarks=reachable)
        return p @ v

    def _attend_topk(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lk: torch.Tensor,
        q_pos: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        """Top-k retrieval: each (query, head) reads the landmark keys, its top_k past blocks and its
        own block, gathered from the cache. Same shapes as ``_attend_dense``."""
        b, h, t, d = q.shape
        bs, scale = self.config.block_size, 1.0 / math.sqrt(d)
        n, s_len = lk.shape[2], k.shape[2]
        gate = (q @ lk.transpose(-1, -2)) * scale  # (B, H, T, n): the only all-block scan
        stingy = self._stingy
        if stingy:
            gate = self._stingy_gate(q, lk, gate, q_pos, start // bs)
        past_ok = self._past_blocks(q_pos, start // bs, n)
        top = min(self.config.top_k, n)
        idx, ok = select_top_blocks(gate, past_ok, top)  # (B, H, T, top)
        self.last_retrieved = torch.where(ok, idx + start // bs, -1)
        self.last_mapped = self.last_retrieved
        if stingy and top > 0:
            self.last_mapped = stingy_retrieved_blocks(
                q_pos // bs, idx + start // bs, ok, self.config.top_k
            )
            # each retrieved block moves forward by shift positions; the query turns back instead
            shift = torch.where(ok, self.last_mapped - self.last_retrieved, 0) * bs
            shiftf = shift.reshape(b * h, t, top)
            lkf = lk.reshape(b * h, n, d)
        # the query's own block: slots q_block * bs + j, read up to the query itself
        slots = (q_pos // bs)[:, None] * bs + torch.arange(bs, device=q.device)[None, :]  # (T, bs)
        local_ok = slots <= q_pos[:, None]
        local_idx = (slots - start).clamp(max=s_len - 1)
        kf, vf = k.reshape(b * h, s_len, d), v.reshape(b * h, s_len, d)
        kb = kf[:, : n * bs].view(b * h, n, bs, d)
        vb = vf[:, : n * bs].view(b * h, n, bs, d)
        rows = torch.arange(b * h, device=q.device)[:, None, None]
        qf, gf = q.reshape(b * h, t, d), gate.reshape(b * h, t, n)
        idxf, okf = idx.reshape(b * h, t, top), ok.reshape(b * h, t, top)
        outs = []
        for c0 in range(0, t, _QUERY_CHUNK):
            cs = slice(c0, min(c0 + _QUERY_CHUNK, t))
            qc = qf[:, cs]
            k_loc, v_loc = kf[:, local_idx[cs]], vf[:, local_idx[cs]]  # (BH, Tc, bs, D)
            s_loc = torch.einsum("ntd,ntjd->ntj", qc, k_loc) * scale
            s_loc = s_loc.masked_fill(~local_ok[cs], float("-inf"))
            parts, values = [s_loc], [v_loc]
            if top > 0:
                k_ret, v_ret = kb[rows, idxf[:, cs]], vb[rows, idxf[:, cs]]  # (BH, Tc, top, bs, D)
                if stingy:  # the query rotated back by each retrieved block's shift
                    q_ret = self._rotate_each(qc[:, :, None].expand(-1, -1, top, -1), -shiftf[:, cs])
                    s_ret = torch.einsum("ntkd,ntkjd->ntkj", q_ret, k_ret) * scale
                    g = torch.einsum("ntkd,ntkd->ntk", q_ret, lkf[rows, idxf[:, cs]]) * scale
                else:
                    s_ret = torch.einsum("ntd,ntkjd->ntkj", qc, k_ret) * scale
                    g = gf[:, cs].gather(-1, idxf[:, cs])
                past = s_ret - torch.logsumexp(s_ret, -1, keepdim=True) + g[..., None]
                past = torch.where(okf[:, cs, :, None], past, float("-inf"))
                parts.append(past.flatten(-2))
                values.append(v_ret.flatten(-3, -2))
            p = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
            outs.append(torch.einsum("ntj,ntjd->ntd", p, torch.cat(values, dim=-2)))
        if not self.training:
            self._count(q, ok, local_ok, landmarks=past_ok)
        return torch.cat(outs, dim=1).view(b, h, t, d)

    def _count(
        self, q: torch.Tensor, blocks: torch.Tensor, local: torch.Tensor, landmarks: torch.Tensor
    ) -> None:
        """Accumulate what the queries read: landmark keys (landmarks: (T, n) past blocks), tokens of
        the blocks attended (blocks: (B, H, T, k) or (T, n) shared by all heads), local tokens."""
        b, h, t, _ = q.shape
        bh = b * h
        per_query = 1 if blocks.dim() == 4 else bh
        self.stats["queries"] += bh * t
        self.stats["landmarks_scanned"] += int(landmarks.sum()) * bh
        self.stats["retrieved_tokens"] += int(blocks.sum()) * per_query * self.config.block_size
        self.stats["local_tokens"] += int(local.sum()) * bh

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        bs = self.config.block_size
        pos0, start = state["pos"], state["start"]
        pos_end = pos0 + t
        q, k, v = self.project(x, pos0)
        k_all = torch.cat([state["k"], k], dim=2)  # positions start .. pos_end - 1
        v_all = torch.cat([state["v"], v], dim=2)
        first_block = start // bs
        lk = state["lk"]
        new_from, n_done = first_block + lk.shape[2], pos_end // bs
        if n_done > new_from:  # blocks completed by this call get their landmark now
            kb = k_all[:, :, new_from * bs - start : n_done * bs - start]
            kb = kb.unflatten(2, (n_done - new_from, bs))
            lk = torch.cat([lk, self.landmark_keys(kb, new_from)], dim=2)
        q_pos = torch.arange(pos0, pos_end, device=x.device)
        if self.config.mode == "grouped":
            o = self._attend_dense(q, k_all, v_all, lk, q_pos, start)
        else:
            o = self._attend_topk(q, k_all, v_all, lk, q_pos, start)
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, self.d_model))
        if self.config.memory_blocks is not None:
            keep = max(first_block, n_done - self.config.memory_blocks)
            drop = keep - first_block
            k_all, v_all, lk = k_all[:, :, drop * bs :], v_all[:, :, drop * bs :], lk[:, :, drop:]
            start = keep * bs
        return y, {"k": k_all, "v": v_all, "lk": lk, "pos": pos_end, "start": start}
