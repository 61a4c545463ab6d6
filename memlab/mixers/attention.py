"""Softmax attention baselines: causal full attention (GQA option) and sliding-window attention.

The state is the KV cache: all past keys and values for ``attention`` (grows with T), the
last ``window - 1`` for ``sliding_window`` (bounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.rope import rotary


@dataclass(kw_only=True)
class AttentionConfig(MixerConfig):
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (MHA); fewer gives GQA / MQA
    rope: bool = True
    rope_base: float = 10000.0
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_positive(self, "n_heads", "n_kv_heads")
        check_divides(self, "n_heads", "d_model")
        check_divides(self, "n_kv_heads", "n_heads")
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"{type(self).__name__}: rope needs an even head dim, got {self.d_model // self.n_heads}"
            )


@dataclass(kw_only=True)
class SlidingWindowConfig(AttentionConfig):
    window: int = 64  # a query at t sees keys in (t - window, t]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "window")


def causal_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, n_unused: int = 0
) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, H, S, D) with S >= T, queries aligned to the last T keys.

    Returns (B, H, T, D). ``window`` restricts query t to keys in (t - window, t]; the first
    ``n_unused`` keys are cache slots not written yet (zeros), never attended.
    """
    t, s = q.shape[2], k.shape[2]
    qpos = torch.arange(s - t, s, device=q.device)[:, None]
    kpos = torch.arange(s, device=q.device)[None, :]
    allowed = (kpos <= qpos) & (kpos >= n_unused)
    if window is not None:
        allowed = allowed & (kpos > qpos - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@register("attention")
class Attention(Mixer):
    """Causal softmax attention with rotary positions; GQA when n_kv_heads < n_heads."""

    Config = AttentionConfig
    constant_state = False
    test_config = {"n_heads": 4, "n_kv_heads": 2}

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads, self.n_kv_heads = c.n_heads, c.n_kv_heads
        self.head_dim = c.d_model // c.n_heads
        self.q_proj = nn.Linear(c.d_model, c.n_heads * self.head_dim, bias=c.bias)
        self.kv_proj = nn.Linear(c.d_model, 2 * c.n_kv_heads * self.head_dim, bias=c.bias)
        self.o_proj = nn.Linear(c.n_heads * self.head_dim, c.d_model, bias=c.bias)

    def _keep(self) -> int | None:
        """How many past keys the state must keep (None: all)."""
        return None

    def _window(self) -> int | None:
        return None

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        pos0 = state["pos"]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, t, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.config.rope:
            positions = torch.arange(pos0, pos0 + t, device=x.device)
            q = rotary(q, positions, self.config.rope_base)
            k = rotary(k, positions, self.config.rope_base)
        k_all = torch.cat([state["k"], k], dim=2)
        v_all = torch.cat([state["v"], v], dim=2)
        rep = self.n_heads // self.n_kv_heads
        # A cache holds at most pos0 real keys; slots before them are unwritten zeros (the fixed-size
        # sliding-window cache of init_state).
        n_unused = max(state["k"].shape[2] - pos0, 0)
        o = causal_attend(
            q, k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1), self._window(), n_unused
        )
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        keep = self._keep()
        if keep is not None:
            start = max(k_all.shape[2] - keep, 0)
            k_all, v_all = k_all[:, :, start:], v_all[:, :, start:]
        return y, {"k": k_all, "v": v_all, "pos": pos0 + t}


@register("sliding_window")
class SlidingWindowAttention(Attention):
    """Causal attention restricted to the last ``window`` keys; the state keeps window - 1."""

    Config = SlidingWindowConfig
    constant_state = True
    test_config = {"n_heads": 4, "n_kv_heads": 2, "window": 6}

    def _keep(self) -> int | None:
        return self.config.window - 1

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        # The cache has its final size (window - 1 slots, zeros until written) from the start, so the
        # state is constant-size as constant_state promises: an empty cache that grew up to the
        # window made state bytes depend on the prefill length below window - 1 (as based's does not).
        shape = (batch_size, self.n_kv_heads, self.config.window - 1, self.head_dim)
        empty = torch.zeros(shape, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def _window(self) -> int | None:
        return self.config.window
