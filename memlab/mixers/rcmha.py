"""RCMHA: Relative Convolutional Multi-Head Attention (Sugiharto, Aradea & Mubarok, 2023).

RCMHA changes two parts of multi-head attention:

1. a depthwise convolution over time on the projected query, key and value inputs: every one
   of the 3 * d_model channels has its own ``kernel_size``-tap causal filter (kernel 3 as in
   Multi-DConv-Head Attention), so q_t, k_t, v_t each mix token t with its kernel_size - 1
   predecessors;
2. relative positional encoding in the attention scores, with no absolute positions anywhere:

   - ``relative="xl"`` (the paper's choice, Transformer-XL / RMHA style)::

         s_ij = ((q_i + u) . k_j + (q_i + w) . r_(i-j)) / sqrt(D),   r_d = W_r phi(d)

     with phi the sinusoidal embedding of the distance d = i - j >= 0 and u, w learned per head;
   - ``relative="bucket"``: s_ij = q_i . k_j / sqrt(D) + b_h[bucket(i - j)], a learned bias per
     log-spaced distance bucket (exact up to n_buckets / 2, logarithmic up to max_distance).

Either way the positional term is a function of i - j only, so the scores are shift
invariant (``positional_term`` exposes it for tests).

State (grows with T): the KV cache of the convolved keys and values, the last
kernel_size - 1 projected (pre-convolution) inputs, and the position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register

RELATIVE_KINDS = ("xl", "bucket")


@dataclass(kw_only=True)
class RCMHAConfig(MixerConfig):
    n_heads: int = 4
    kernel_size: int = 3  # taps of the depthwise causal convolution on q, k, v
    relative: str = "xl"  # "xl" (Transformer-XL relative encoding) or "bucket" (learned bias)
    n_buckets: int = 32  # bucket mode: number of distance buckets
    max_distance: int = 128  # bucket mode: distances beyond this share the last bucket
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n_heads", "kernel_size", "n_buckets", "max_distance")
        check_divides(self, "n_heads", "d_model")
        if self.relative not in RELATIVE_KINDS:
            raise ValueError(
                f"RCMHAConfig.relative must be one of {RELATIVE_KINDS}, got {self.relative!r}"
            )
        if self.relative == "xl" and self.d_model % 2:
            raise ValueError(
                f"RCMHAConfig: relative='xl' needs an even d_model for the sinusoids, got {self.d_model}"
            )
        if self.relative == "bucket":
            if self.n_buckets < 2:
                raise ValueError(f"RCMHAConfig.n_buckets must be >= 2, got {self.n_buckets}")
            if self.max_distance <= self.n_buckets // 2:
                raise ValueError(
                    f"RCMHAConfig.max_distance={self.max_distance} must exceed "
                    f"n_buckets // 2 = {self.n_buckets // 2}"
                )


def sinusoid(distances: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """distances: (S,) -> (S, dim) sinusoidal embeddings [sin(d w_k), cos(d w_k)], w_k = 1e4^(-2k/dim)."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float64) / dim))
    ang = distances.to(torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(dtype)


def distance_bucket(distance: torch.Tensor, n_buckets: int, max_distance: int) -> torch.Tensor:
    """Causal distances d >= 0 (any shape, int) -> bucket ids in [0, n_buckets).

    The first n_buckets // 2 distances get a bucket each; larger ones are spaced
    logarithmically up to ``max_distance``, and everything further shares the last bucket.
    """
    exact = n_buckets // 2
    d = distance.clamp(min=0)
    # log-spaced buckets for d >= exact; clamp inside the log so that d < exact stays finite
    far = exact + (
        torch.log(d.clamp(min=exact).to(torch.float64) / exact)
        / math.log(max_distance / exact)
        * (n_buckets - exact)
    ).long()
    far = far.clamp(max=n_buckets - 1)
    return torch.where(d < exact, d, far)


@register("rcmha")
class RCMHA(Mixer):
    """Multi-head attention with depthwise causal convolution on q, k, v and relative positions."""

    Config = RCMHAConfig
    constant_state = False
    test_config = {"n_heads": 4, "kernel_size": 3}

    def __init__(self, config: RCMHAConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads = c.n_heads
        self.head_dim = c.d_model // c.n_heads
        self.qkv_proj = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias)
        # depthwise: one (kernel_size,) filter per channel of q, k and v
        self.conv_weight = nn.Parameter(torch.empty(3 * c.d_model, 1, c.kernel_size))
        nn.init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        if c.relative == "xl":
            self.r_proj = nn.Linear(c.d_model, c.d_model, bias=False)
            # u: content bias, w: position bias (Transformer-XL's u and v), zero at init
            self.u = nn.Parameter(torch.zeros(c.n_heads, self.head_dim))
            self.w = nn.Parameter(torch.zeros(c.n_heads, self.head_dim))
        else:
            self.bucket_bias = nn.Parameter(torch.zeros(c.n_heads, c.n_buckets))

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        keep = self.config.kernel_size - 1
        conv = torch.zeros(batch_size, keep, 3 * self.d_model, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "conv": conv, "pos": 0}

    def positional_term(
        self, q: torch.Tensor, distance: torch.Tensor, max_distance: int | None = None
    ) -> torch.Tensor:
        """The relative-position part of the (scaled) scores.

        q: (B, H, T, D); distance: (T, S) integer i - j (negative entries are masked later);
        max_distance: the largest entry of ``distance`` if known (saves a device sync).
        Returns (B, H, T, S), a function of the distance only (and of q in "xl" mode).
        """
        d = distance.clamp(min=0)
        if self.config.relative == "bucket":
            ids = distance_bucket(d, self.config.n_buckets, self.config.max_distance)
            return self.bucket_bias[:, ids].unsqueeze(0).to(q.dtype)
        n_dist = (int(d.max().item()) if max_distance is None else max_distance) + 1
        r = self.r_proj(sinusoid(torch.arange(n_dist, device=q.device), self.d_model, q.dtype))
        r = r.view(n_dist, self.n_heads, self.head_dim).transpose(0, 1)  # (H, n_dist, D)
        # scale folded into q: one (B, H, T, n_dist) product instead of a division over it
        per_distance = ((q + self.w[:, None, :].to(q.dtype)) / math.sqrt(self.head_dim)) @ r.transpose(-1, -2)
        index = d.expand(q.shape[0], self.n_heads, *d.shape)
        return per_distance.gather(-1, index)

    def scores(
        self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        """Pre-softmax scores. q: (B, H, T, D), k: (B, H, S, D), positions (T,), (S,) -> (B, H, T, S).

        Keys after the query (k_pos > q_pos) get -inf.
        """
        distance = q_pos[:, None] - k_pos[None, :]
        content = q + self.u[:, None, :].to(q.dtype) if self.config.relative == "xl" else q
        s = content @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        s = s + self.positional_term(q, distance)
        return s.masked_fill(distance < 0, float("-inf"))

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        pos0 = state["pos"]
        # causal depthwise convolution: prepend the last kernel_size - 1 projected inputs
        history = torch.cat([state["conv"], self.qkv_proj(x)], dim=1)  # (B, K-1+T, 3d)
        mixed = F.conv1d(history.transpose(1, 2), self.conv_weight, groups=3 * self.d_model)
        q, k, v = mixed.transpose(1, 2).reshape(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k_all = torch.cat([state["k"], k], dim=2)
        v_all = torch.cat([state["v"], v], dim=2)
        s = k_all.shape[2]
        q_pos = torch.arange(pos0, pos0 + t, device=x.device)
        k_pos = torch.arange(pos0 + t - s, pos0 + t, device=x.device)
        distance = q_pos[:, None] - k_pos[None, :]
        # SDPA adds attn_mask to (q' . k) / sqrt(D): q' carries u, the mask the positional term
        bias = self.positional_term(q, distance, s - 1).masked_fill(distance < 0, float("-inf"))
        q_content = q + self.u[:, None, :].to(q.dtype) if self.config.relative == "xl" else q
        o = F.scaled_dot_product_attention(q_content, k_all, v_all, attn_mask=bias)
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, self.d_model))
        keep = self.config.kernel_size - 1
        conv_state = history[:, history.shape[1] - keep :]
        return y, {"k": k_all, "v": v_all, "conv": conv_state, "pos": pos0 + t}
