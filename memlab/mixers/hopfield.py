"""Modern Hopfield retrieval from the causal past (Ramsauer et al., "Hopfield Networks is All You Need").

The continuous modern Hopfield network stores patterns X = (x_1 .. x_N) and updates a state
pattern xi by

    xi_new = X^T softmax(beta X xi)

which minimises the energy E(xi) = -lse(beta, X xi) + xi^T xi / 2 + log(N) / beta + M^2 / 2
(M = max_i |x_i|); one update typically lands next to a stored pattern when the patterns are
well separated. With projections this is the paper's ``Hopfield`` layer: the state pattern is
the query R W_Q, the stored patterns are Y W_K, and the retrieved result is read out through the
pattern projection Y W_V.

As a causal mixer, the stored patterns of token t are the projected tokens s <= t (the last
``window`` of them when ``window`` is set), and its state pattern is its own query. With
``update_steps`` = n, the first n - 1 updates move xi inside the stored-pattern (key) space,
xi <- K^T softmax(beta K xi), and the n-th update's weights read the values: y = V^T softmax(beta K xi).
n = 1 is exactly softmax attention with scale beta. Every update is one masked
scaled-dot-product attention call, so training is parallel over T.

State: the projected keys and values of every past token (or the last window - 1), like an
attention KV cache, so it grows with T when ``window`` is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.rope import rotary


def _check_patterns(xi: torch.Tensor, patterns: torch.Tensor, beta: float) -> None:
    if xi.dim() < 2 or patterns.dim() < 2 or xi.shape[-1] != patterns.shape[-1]:
        raise ValueError(
            "xi must be (..., Q, D) and patterns (..., N, D) with the same D, got "
            f"xi {tuple(xi.shape)} and patterns {tuple(patterns.shape)}"
        )
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")


def hopfield_update(
    xi: torch.Tensor,
    patterns: torch.Tensor,
    beta: float,
    steps: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``steps`` modern Hopfield updates xi <- X^T softmax(beta X xi).

    xi: (..., Q, D) state patterns (Q of them, updated independently); patterns: (..., N, D)
    stored patterns X; mask: optional bool (Q, N) or broadcastable, True where pattern n may be
    used by state pattern q. Returns the updated state patterns (..., Q, D).
    """
    _check_patterns(xi, patterns, beta)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    for _ in range(steps):
        # softmax(beta xi X^T) X is attention with the patterns as both keys and values.
        xi = F.scaled_dot_product_attention(xi, patterns, patterns, attn_mask=mask, scale=float(beta))
    return xi


def hopfield_energy(xi: torch.Tensor, patterns: torch.Tensor, beta: float) -> torch.Tensor:
    """E(xi) = -lse(beta, X xi) + xi^T xi / 2 + log(N) / beta + M^2 / 2, with M = max_n |x_n|.

    xi: (..., Q, D); patterns: (..., N, D). Returns (..., Q). lse(beta, z) = log(sum exp(beta z)) / beta.
    The constants make E >= 0; Hopfield updates never increase E (the paper's Theorem 1).
    """
    _check_patterns(xi, patterns, beta)
    n = patterns.shape[-2]
    sims = xi @ patterns.transpose(-1, -2)  # (..., Q, N)
    lse = torch.logsumexp(beta * sims, dim=-1) / beta
    big_m = patterns.norm(dim=-1).amax(dim=-1, keepdim=True)  # (..., 1)
    return -lse + 0.5 * (xi * xi).sum(-1) + math.log(n) / beta + 0.5 * big_m**2


@dataclass(kw_only=True)
class HopfieldConfig(MixerConfig):
    n_heads: int = 4
    beta: float | None = None  # None: 1 / sqrt(head_dim), the paper's choice for the attention case
    update_steps: int = 1  # Hopfield updates per token; 1 is softmax attention
    window: int | None = None  # None: every past token is a stored pattern; else the last `window`
    rope: bool = True  # rotary positions on queries and stored patterns (memlab LMs have no position table)
    rope_base: float = 10000.0
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n_heads", "update_steps")
        check_divides(self, "n_heads", "d_model")
        if self.window is not None:
            check_positive(self, "window")
        if self.beta is None:
            self.beta = 1.0 / math.sqrt(self.d_model // self.n_heads)
        if not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"{type(self).__name__}.beta must be a positive number, got {self.beta!r}")
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"{type(self).__name__}: rope needs an even head dim, got {self.d_model // self.n_heads}"
            )


@register("hopfield")
class Hopfield(Mixer):
    """Multi-head modern Hopfield layer retrieving from the causal past (state grows like a KV cache)."""

    Config = HopfieldConfig
    constant_state = False
    test_config = {"n_heads": 2, "update_steps": 3}

    def __init__(self, config: HopfieldConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads = c.n_heads
        self.head_dim = c.d_model // c.n_heads
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)  # state pattern R W_Q
        self.k_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)  # stored patterns Y W_K
        self.v_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)  # pattern projection Y W_V
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T, d_model) -> y: (B, T, d_model); state {"k", "v": (B, H, S, Dh), "pos"}."""
        self.check_input(x)
        b, t, _ = x.shape
        c = self.config
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        pos0 = state["pos"]
        h, dh = self.n_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(b, t, h, dh).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, dh).transpose(1, 2)
        if c.rope:
            positions = torch.arange(pos0, pos0 + t, device=x.device)
            q = rotary(q, positions, c.rope_base)
            k = rotary(k, positions, c.rope_base)
        k_all = torch.cat([state["k"], k], dim=2)  # (B, H, S, Dh): stored patterns
        v_all = torch.cat([state["v"], v], dim=2)

        # Query t (absolute pos0 + t) may use stored pattern s iff s <= t (and s > t - window).
        s = k_all.shape[2]
        qpos = torch.arange(s - t, s, device=x.device)[:, None]
        kpos = torch.arange(s, device=x.device)[None, :]
        allowed = kpos <= qpos
        if c.window is not None:
            allowed = allowed & (kpos > qpos - c.window)

        xi = hopfield_update(q, k_all, c.beta, c.update_steps - 1, mask=allowed)
        o = F.scaled_dot_product_attention(xi, k_all, v_all, attn_mask=allowed, scale=float(c.beta))
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

        if c.window is not None:
            start = max(s - (c.window - 1), 0)
            k_all, v_all = k_all[:, :, start:], v_all[:, :, start:]
        return y, {"k": k_all, "v": v_all, "pos": pos0 + t}
