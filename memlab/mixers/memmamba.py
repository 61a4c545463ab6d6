"""MemMamba (Wang et al., 2025): Mamba layers that take notes, and read them back across tokens and
across layers, at linear cost in the sequence length.

Mamba's memory of a token decays exponentially with distance. MemMamba keeps a bounded pool of
compressed "notes" of salient tokens beside each Mamba layer and lets later tokens (cross-token
attention) and later layers (cross-layer attention) attend to them. One memlab mixer holds a
small stack of ``n_layers`` such layers, because cross-layer attention needs the pools of earlier
layers and a mixer is the unit that owns a state. Layer l, with residual stream u (B, T, d_model):

    u   = u + CrossLayerAttn(norm'(u), pools of layers 0..l-1)   if l >= 1 and l % cross_layer_every == 0
    h   = Mamba_l(norm(u))                                        memlab's ``mamba`` mixer
    a_t = sigmoid(w_a . h_t + b_a)                                token importance I_token
    note_t = a_t * W_N h_t                                        summary N, (d_summary,)
    c_t = CrossTokenAttn(h_t, pool_l as of t)                     softmax over the visible notes
    s_t = sigmoid(w_s . h_t + b_s)                                state importance I_state
    u   = u + h + [s_t > tau_state] * s_t * c_t

and the mixer returns u - x (the sum of the layers' residual updates; memlab's LM adds x back).

Note writing (the Note Block). Tokens are grouped into windows of ``summary_every`` tokens at
absolute positions. When a window completes, its most important token (largest a_t) is written
to the pool if a_t > tau_token (tau_1 in the paper); with ``summary_every=1`` every token whose
importance crosses tau_1 is noted, the paper's rule. The pool is bounded at ``pool_size`` notes
with priority replacement: when it is full, a new note evicts the least important note if it
beats it, so the pool always holds the ``pool_size`` most important notes written so far. Tokens
of a window read the pool as it was when their window started, so a token never sees its own
note and the function is causal.

The note is scaled by a_t: the write decision is a hard threshold, as in the paper, and the
scaling is what gives the importance scorer a gradient. The retrieval gate [s_t > tau_state]
(tau_2) is hard as in the paper and scaled by s_t for the same reason.

Training form (parallel, linear in T). Windows are processed in blocks of ``select_chunk``
windows; in a block, window g may see the pool at the block start plus the block's notes of
windows before g; its visible set is the top ``pool_size`` of those by importance (the same set
the sequential priority rule keeps, since "keep the k best" composes). Every token of a block
attends over those pool_size + select_chunk candidate notes under that mask, so the work per
token is O(pool_size + select_chunk). Cross-layer attention reuses the same candidates and masks
of the earlier layers. Nothing depends on where a sequence is split into calls: windows sit at
absolute positions, and the best token of an unfinished window is carried in the state.

State (constant size) per layer: the Mamba state (conv tail, SSM state), the pool
(pool_size, d_summary) notes and their importances, and the best note of the unfinished window;
plus the absolute position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.mamba import Mamba, MambaConfig

EMPTY = -1.0  # importance of an empty pool slot; real importances are sigmoids in (0, 1)
_HIDDEN = -2.0  # importance given to notes a window may not see yet (later windows of its block)


@dataclass(kw_only=True)
class MemMambaConfig(MixerConfig):
    n_layers: int = 2
    pool_size: int = 50
    d_summary: int = 64
    n_heads: int = 4  # heads of the cross-token and cross-layer attentions, over d_summary
    summary_every: int = 1  # window length; 1: the paper's per-token note rule
    tau_token: float = 0.5  # write a window's best note when its importance exceeds this (tau_1)
    tau_state: float = 0.3  # read the pool at token t when its state importance exceeds this (tau_2)
    cross_layer_every: int = 1  # layers l >= 1 with l % cross_layer_every == 0 read earlier pools
    select_chunk: int = 64  # windows per block of the parallel pool scan
    # options of the Mamba layers
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    chunk_size: int = 64
    checkpoint: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(
            self, "n_layers", "pool_size", "d_summary", "n_heads", "summary_every", "cross_layer_every",
            "select_chunk", "d_state", "d_conv", "expand", "chunk_size",
        )
        check_divides(self, "n_heads", "d_summary")
        for name in ("tau_token", "tau_state"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{type(self).__name__}.{name} must be in [0, 1), got {value!r}")
        if self.n_layers > 1 and self.cross_layer_every >= self.n_layers:
            raise ValueError(
                f"{type(self).__name__}.cross_layer_every={self.cross_layer_every} must be below "
                f"n_layers={self.n_layers}, or no layer reads the pools of earlier layers"
            )


class PoolAttention(nn.Module):
    """Multi-head attention from tokens (d_model) to notes (d_summary) under a visibility mask."""

    def __init__(self, d_model: int, d_summary: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_summary // n_heads
        self.q = nn.Linear(d_model, d_summary, bias=False)
        self.k = nn.Linear(d_summary, d_summary, bias=False)
        self.v = nn.Linear(d_summary, d_summary, bias=False)
        self.o = nn.Linear(d_summary, d_model, bias=False)

    def forward(self, x: torch.Tensor, notes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x: (B, NB, C, S, d_model) tokens grouped by block and window; notes: (B, NB, K, d_summary);
        visible: (B, NB, C, K) bool, which notes each window sees. Returns (B, NB, C, S, d_model);
        a token that sees no note gets exactly 0."""
        b, nb, c, s, _ = x.shape
        k_len, h, dh = notes.shape[2], self.n_heads, self.head_dim
        q = self.q(x).view(b, nb, c, s, h, dh)
        k = self.k(notes).view(b, nb, k_len, h, dh)
        v = self.v(notes).view(b, nb, k_len, h, dh)
        scores = torch.einsum("bncshd,bnkhd->bnhcsk", q, k) / math.sqrt(dh)
        mask = visible[:, :, None, :, None, :]  # (B, NB, 1, C, 1, K)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        # A window with nothing visible would get a uniform average of masked notes: zero it.
        weights = torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)
        out = torch.einsum("bnhcsk,bnkhd->bncshd", weights, v).reshape(b, nb, c, s, h * dh)
        return self.o(out)


class MemMambaLayer(nn.Module):
    """One Mamba layer with its note pool, cross-token attention and (optionally) cross-layer attention."""

    def __init__(self, config: MemMambaConfig, reads_earlier: bool) -> None:
        super().__init__()
        c = config
        d, ds = c.d_model, c.d_summary
        self.norm = nn.RMSNorm(d)
        self.mamba = Mamba(
            MambaConfig(
                d_model=d, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand,
                chunk_size=c.chunk_size, checkpoint=c.checkpoint,
            )
        )
        self.score_token = nn.Linear(d, 1)
        self.score_state = nn.Linear(d, 1)
        self.summarize = nn.Linear(d, ds)
        self.token_attn = PoolAttention(d, ds, c.n_heads)
        self.cross_norm = nn.RMSNorm(d) if reads_earlier else None
        self.cross_attn = PoolAttention(d, ds, c.n_heads) if reads_earlier else None


def _group(x: torch.Tensor, left: int, n_blocks: int, block: int, window: int) -> torch.Tensor:
    """(B, T, ...) -> (B, NB, C, S, ...): pad ``left`` zeros in front (the earlier part of the first
    window) and zeros at the end, then cut into blocks of C windows of S tokens."""
    total = n_blocks * block * window
    pad = [0, 0] * (x.dim() - 2) + [left, total - left - x.shape[1]]
    return F.pad(x, pad).view(x.shape[0], n_blocks, block, window, *x.shape[2:])


def note_pool_scan(
    importance: torch.Tensor,
    notes: torch.Tensor,
    layer_state: State,
    offset: int,
    n_blocks: int,
    block: int,
    window: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Which notes each window may read, for a whole call at once.

    importance: (B, T) in (0, 1); notes: (B, T, Ds); ``offset`` = position of the first token in
    its window (absolute position mod ``window``). Windows are indexed g = 0 .. NB * C - 1 from the
    window holding the first token. Returns
      candidates (B, NB, P + C, Ds): per block, the pool at the block start then the block's notes;
      visible (B, NB, C, P + C) bool: candidate j is among the top-P valid notes window g may see;
    and the layer's new pool entries of the state.
    """
    b, t = importance.shape
    ds = notes.shape[-1]
    pool_score, pool_note = layer_state["pool_score"], layer_state["pool_note"]
    p = pool_score.shape[1]
    n_windows = n_blocks * block
    # The best note of the window's earlier tokens (from earlier calls) sits just before the first
    # token, so ties keep resolving to the earliest token as in one uninterrupted call.
    lead_s = importance.new_full((b, offset), EMPTY)
    lead_n = notes.new_zeros(b, offset, ds)
    if offset:
        lead_s = torch.cat([lead_s[:, 1:], layer_state["part_score"][:, None]], dim=1)
        lead_n = torch.cat([lead_n[:, 1:], layer_state["part_note"][:, None]], dim=1)
    tail = n_windows * window - offset - t
    scores = torch.cat([lead_s, importance, importance.new_full((b, tail), EMPTY)], dim=1)
    scores = scores.view(b, n_windows, window)
    all_notes = torch.cat([lead_n, notes, notes.new_zeros(b, tail, ds)], dim=1).view(b, n_windows, window, ds)
    best, arg = scores.max(dim=-1)  # (B, W): first maximal token of each window
    best_note = all_notes.gather(2, arg[:, :, None, None].expand(b, n_windows, 1, ds))[:, :, 0]
    n_complete = (offset + t) // window
    complete = torch.arange(n_windows, device=importance.device) < n_complete
    written = complete & (best > tau)
    cand_s = torch.where(written, best, torch.full_like(best, EMPTY))
    cand_n = best_note * written[..., None]
    if (offset + t) % window:
        part_s, part_n = best[:, n_complete], best_note[:, n_complete]
    else:
        part_s, part_n = torch.full_like(best[:, 0], EMPTY), torch.zeros_like(best_note[:, 0])

    idx = torch.arange(block, device=importance.device)
    eligible = torch.cat(
        [torch.ones(block, p, dtype=torch.bool, device=importance.device), idx[None, :] < idx[:, None]], dim=1
    )  # (C, P + C): the pool always, the block's notes only from earlier windows
    cands, masks = [], []
    for blk in range(n_blocks):
        sl = slice(blk * block, (blk + 1) * block)
        all_s = torch.cat([pool_score, cand_s[:, sl]], dim=1)  # (B, P + C)
        all_n = torch.cat([pool_note, cand_n[:, sl]], dim=1)  # (B, P + C, Ds)
        seen = torch.where(eligible, all_s[:, None, :], torch.full_like(all_s[:, None, :], _HIDDEN))
        top = seen.topk(p, dim=-1).indices  # (B, C, P)
        vis = torch.zeros_like(seen, dtype=torch.bool).scatter(-1, top, True) & (seen > 0)
        cands.append(all_n)
        masks.append(vis)
        keep = all_s.topk(p, dim=-1).indices  # the pool after the block: its P best notes
        pool_score = all_s.gather(1, keep)
        pool_note = all_n.gather(1, keep[..., None].expand(b, p, ds))
    new_state = {"pool_score": pool_score, "pool_note": pool_note, "part_score": part_s, "part_note": part_n}
    return torch.stack(cands, dim=1), torch.stack(masks, dim=1), new_state


@register("memmamba")
class MemMamba(Mixer):
    """A stack of Mamba layers with note pools, cross-token and cross-layer attention over the notes."""

    Config = MemMambaConfig
    constant_state = True
    test_config = {
        "n_layers": 2, "pool_size": 3, "d_summary": 8, "n_heads": 2, "summary_every": 2,
        "select_chunk": 2, "d_state": 4, "chunk_size": 4,
    }

    def __init__(self, config: MemMambaConfig) -> None:
        super().__init__(config)
        c = config
        self.layers = nn.ModuleList(
            MemMambaLayer(c, reads_earlier=l >= 1 and l % c.cross_layer_every == 0) for l in range(c.n_layers)
        )

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        c = self.config
        kw = {"device": device, "dtype": dtype}
        layers = [
            {
                "mamba": layer.mamba.init_state(batch_size, device, dtype),
                "pool_score": torch.full((batch_size, c.pool_size), EMPTY, **kw),
                "pool_note": torch.zeros(batch_size, c.pool_size, c.d_summary, **kw),
                "part_score": torch.full((batch_size,), EMPTY, **kw),
                "part_note": torch.zeros(batch_size, c.d_summary, **kw),
            }
            for layer in self.layers
        ]
        return {"layers": layers, "pos": 0}

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        c = self.config
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        pos0 = state["pos"]
        s = c.summary_every
        offset = pos0 % s
        n_windows = -(-(offset + t) // s)
        block = min(c.select_chunk, n_windows)
        n_blocks = -(-n_windows // block)

        def attend(attn: PoolAttention, queries: torch.Tensor, notes: torch.Tensor, vis: torch.Tensor):
            grouped = _group(queries, offset, n_blocks, block, s)  # (B, NB, C, S, d)
            out = attn(grouped, notes, vis).reshape(b, -1, self.d_model)
            return out[:, offset : offset + t]

        u = x
        read: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: candidate notes and masks
        new_layers = []
        for layer, st in zip(self.layers, state["layers"], strict=True):
            if layer.cross_attn is not None:
                notes = torch.cat([n for n, _ in read], dim=2)  # (B, NB, l * (P + C), Ds)
                vis = torch.cat([v for _, v in read], dim=-1)
                u = u + attend(layer.cross_attn, layer.cross_norm(u), notes, vis)
            h, mamba_state = layer.mamba(layer.norm(u), state=st["mamba"])
            importance = torch.sigmoid(layer.score_token(h))[..., 0]  # (B, T)
            notes = importance[..., None] * layer.summarize(h)  # (B, T, Ds)
            cands, vis, pool_state = note_pool_scan(
                importance, notes, st, offset, n_blocks, block, s, c.tau_token
            )
            read.append((cands, vis))
            retrieved = attend(layer.token_attn, h, cands, vis)
            s_imp = torch.sigmoid(layer.score_state(h))
            u = u + h + (s_imp * (s_imp > c.tau_state)) * retrieved
            new_layers.append({"mamba": mamba_state, **pool_state})
        return u - x, {"layers": new_layers, "pos": pos0 + t}
