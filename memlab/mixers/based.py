"""Based (Arora et al., 2024): Taylor linear attention plus exact sliding-window attention.

Based pairs two cheap ways of remembering: a linear attention whose feature map is the
2nd-order Taylor expansion of exp (global, fixed-size state; the "fuzzy" long-range recall)
and a small exact softmax attention over the last ``window`` tokens (precise local recall).
In the paper these sit in separate layers, alternating with short gated convolutions. Here
one mixer holds them side by side, which keeps a model spec to one slug per layer:

    u = shortconv(x)                       optional depthwise causal conv, kernel ``conv_size``
    y = O_lin(taylor_linear_attention(u)) + O_win(sliding_window_attention(u))

i.e. the two branches read the same (convolved) input and their projected outputs are summed.
``window=0`` drops the window branch, ``conv_size=0`` the convolution.

Taylor feature map: q and k are projected to a small dimension d' (``feature_dim``, 16 as in
the paper) and mapped by phi(x) = [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))], of size
1 + d' + d'^2, so that phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d'): the Taylor
approximation of exp(s). It is >= 1/2 for every s, so the normaliser never vanishes.

Training and prefill from the empty state run, where the kernels run (CUDA), the fused Triton
kernel ``memlab.ops.taylor.taylor_attention``: the same outputs computed from the raw d'-wide
projections in the quadratic "parallel" form, tile by tile, never forming the features of the
queries (``fused=False`` keeps the chunked feature-map form below everywhere). A prefill that
continues a state, and every CPU run, uses the chunked form; decoding the recurrent one.

State (constant size): the linear-attention kv (B, H, 1 + d' + d'^2, Dv) and key sum
(B, H, 1 + d' + d'^2); the last window - 1 keys and values of the window branch (zero-filled
until that many tokens have been seen); the last conv_size - 1 inputs of the convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.linear_core import chunked_linear_attention, recurrent_linear_attention
from memlab.mixers.rope import rotary
from memlab.ops import taylor


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """x: (..., d') -> (..., 1 + d' + d'^2) with phi(q) . phi(k) = 1 + s + s^2/2, s = q.k / sqrt(d')."""
    d = x.shape[-1]
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0 * d)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, second], dim=-1)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_cached: int,
    window: int,
) -> torch.Tensor:
    """Exact causal softmax attention of each query over the keys in (t - window, t].

    q, k, v: (B, H, T, D) for the new tokens; k_cache, v_cache: (B, H, window - 1, D), the keys
    and values before them, right-aligned, of which only the last ``n_cached`` are real.
    Returns (B, H, T, D). Queries go in blocks of Qb = min(window, T); each block sees the
    Qb + window - 1 keys ending at its last query, so memory is O(T * window), not O(T^2).
    """
    b, h, t, d = q.shape
    p = window - 1
    qb = min(window, t)
    n = -(-t // qb)
    pad = n * qb - t
    span = qb + p
    # Padded key axis: [cache (p) | new (t) | zeros (pad)]; block i's keys start at i * qb.
    k_all = F.pad(torch.cat([k_cache, k], dim=2), (0, 0, 0, pad))
    v_all = F.pad(torch.cat([v_cache, v], dim=2), (0, 0, 0, pad))
    k_blocks = k_all.unfold(2, span, qb)  # (B, H, n, D, span)
    v_blocks = v_all.unfold(2, span, qb)
    q_blocks = F.pad(q, (0, 0, 0, pad)).reshape(b, h, n, qb, d)

    # Query j of a block sits at key offset j + p; it may see offsets m with j <= m <= j + p.
    j = torch.arange(qb, device=q.device)[:, None]
    m = torch.arange(span, device=q.device)[None, :]
    band = (m >= j) & (m <= j + p)
    # Cache slots never written yet (fewer than p tokens seen) are not keys.
    real = torch.arange(p + n * qb, device=q.device) >= p - n_cached
    allowed = band[None] & real.unfold(0, span, qb)[:, None, :]  # (n, Qb, span)

    scores = torch.einsum("bhnqd,bhnds->bhnqs", q_blocks, k_blocks) / math.sqrt(d)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhnqs,bhnds->bhnqd", weights, v_blocks)
    return out.reshape(b, h, n * qb, d)[:, :, :t]


@dataclass(kw_only=True)
class BasedConfig(MixerConfig):
    n_heads: int = 1  # linear-attention heads; zoology's MQAR Based runs use one
    feature_dim: int = 16  # d': q, k projected to this before the Taylor map
    chunk_size: int = 64
    eps: float = 1e-12
    window: int = 64  # sliding-window size (the paper's default); 0 turns the branch off
    window_heads: int = 1
    rope: bool = True  # rotary positions in the window branch
    rope_base: float = 10000.0
    conv_size: int = 3  # depthwise causal conv kernel on the input; 0 turns it off
    bias: bool = False
    # Prefill from an empty state through the fused Taylor kernel (memlab.ops.taylor) where it
    # runs (CUDA); False keeps the chunked feature-map form everywhere (benchmarks compare both).
    fused: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n_heads", "feature_dim", "chunk_size", "window_heads")
        check_divides(self, "n_heads", "d_model")
        check_divides(self, "window_heads", "d_model")
        for name in ("window", "conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:  # bool is not a size
                raise ValueError(
                    f"{type(self).__name__}.{name} must be an int >= 0 (0 turns it off), got {value!r}"
                )
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"{type(self).__name__}.eps must be a positive number, got {self.eps!r}")
        if self.window and self.rope and (self.d_model // self.window_heads) % 2:
            raise ValueError(
                f"{type(self).__name__}: rope needs an even window head dim, got "
                f"d_model // window_heads = {self.d_model // self.window_heads}"
            )


@register("based")
class Based(Mixer):
    """Taylor-feature linear attention + sliding-window softmax attention (+ short conv), summed."""

    Config = BasedConfig
    constant_state = True
    test_config = {
        "n_heads": 2,
        "feature_dim": 4,
        "chunk_size": 4,
        "window": 6,
        "window_heads": 2,
        "conv_size": 3,
    }

    def __init__(self, config: BasedConfig) -> None:
        super().__init__(config)
        c = config
        d = c.d_model
        self.n_heads = c.n_heads
        self.head_dim = d // c.n_heads
        self.expanded_dim = 1 + c.feature_dim + c.feature_dim**2
        self.conv: nn.Conv1d | None = None
        if c.conv_size:
            # Only its weight (d_model, 1, K) is used, on an input left-padded with the carried tail.
            self.conv = nn.Conv1d(d, d, c.conv_size, groups=d, bias=False)
        self.q_proj = nn.Linear(d, c.n_heads * c.feature_dim, bias=c.bias)
        self.k_proj = nn.Linear(d, c.n_heads * c.feature_dim, bias=c.bias)
        self.v_proj = nn.Linear(d, d, bias=c.bias)
        self.o_proj = nn.Linear(d, d, bias=c.bias)
        if c.window:
            self.window_heads = c.window_heads
            self.window_head_dim = d // c.window_heads
            self.win_qkv = nn.Linear(d, 3 * d, bias=c.bias)
            self.win_o = nn.Linear(d, d, bias=c.bias)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        c = self.config
        zeros = dict(device=device, dtype=dtype)
        state: State = {
            "kv": torch.zeros(batch_size, self.n_heads, self.expanded_dim, self.head_dim, **zeros),
            "z": torch.zeros(batch_size, self.n_heads, self.expanded_dim, **zeros),
            "pos": 0,
        }
        if c.window:
            shape = (batch_size, self.window_heads, c.window - 1, self.window_head_dim)
            state["win_k"] = torch.zeros(shape, **zeros)
            state["win_v"] = torch.zeros(shape, **zeros)
        if c.conv_size:
            state["conv"] = torch.zeros(batch_size, c.conv_size - 1, c.d_model, **zeros)
        return state

    def _short_conv(self, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D), tail: (B, K-1, D) earlier inputs -> conv output (B, T, D), new tail."""
        k = self.config.conv_size
        xp = torch.cat([tail, x], dim=1)  # (B, K-1+T, D)
        y = F.conv1d(xp.transpose(1, 2), self.conv.weight, groups=self.d_model).transpose(1, 2)
        return y, xp[:, xp.shape[1] - (k - 1) :]

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T, d_model) -> y: (B, T, d_model) and the state after the last token."""
        self.check_input(x)
        b, t, d = x.shape
        c = self.config
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        pos0 = state["pos"]
        new: State = {"pos": pos0 + t}

        u = x
        if self.conv is not None:
            u, new["conv"] = self._short_conv(x, state["conv"])

        # Taylor linear attention: (B, H, T, d') -> features (B, H, T, 1 + d' + d'^2).
        h = self.n_heads
        q_raw = self.q_proj(u).view(b, t, h, c.feature_dim).transpose(1, 2)
        k_raw = self.k_proj(u).view(b, t, h, c.feature_dim).transpose(1, 2)
        v = self.v_proj(u).view(b, t, h, self.head_dim).transpose(1, 2)
        k = taylor_feature_map(k_raw)
        if c.fused and pos0 == 0 and t > 1 and taylor.uses_kernels(q_raw):
            # A fresh state (position 0 is only ever the empty state): the fused kernel computes
            # the same outputs from the raw projections without forming the 1 + d' + d'^2
            # features of the queries; the state after the prompt is its closed-form sum.
            o = taylor.taylor_attention(q_raw, k_raw, v, eps=c.eps)
            new["kv"] = torch.einsum("bhtf,bhtd->bhfd", k, v)
            new["z"] = k.sum(dim=2)
        elif t == 1:
            q = taylor_feature_map(q_raw)
            o, new["kv"], new["z"] = recurrent_linear_attention(q, k, v, state["kv"], state["z"], eps=c.eps)
        else:
            o, new["kv"], new["z"] = chunked_linear_attention(
                taylor_feature_map(q_raw), k, v, state["kv"], state["z"], chunk_size=c.chunk_size, eps=c.eps
            )
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, d))

        if c.window:
            hw, dw = self.window_heads, self.window_head_dim
            wq, wk, wv = self.win_qkv(u).view(b, t, 3, hw, dw).permute(2, 0, 3, 1, 4)  # 3 x (B, Hw, T, Dw)
            if c.rope:
                positions = torch.arange(pos0, pos0 + t, device=x.device)
                wq = rotary(wq, positions, c.rope_base)
                wk = rotary(wk, positions, c.rope_base)
            keep = c.window - 1
            wo = sliding_window_attention(
                wq, wk, wv, state["win_k"], state["win_v"], min(pos0, keep), c.window
            )
            y = y + self.win_o(wo.transpose(1, 2).reshape(b, t, d))
            k_all = torch.cat([state["win_k"], wk], dim=2)
            v_all = torch.cat([state["win_v"], wv], dim=2)
            new["win_k"] = k_all[:, :, k_all.shape[2] - keep :]
            new["win_v"] = v_all[:, :, v_all.shape[2] - keep :]
        return y, new
