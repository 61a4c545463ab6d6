"""Plain kernelized causal linear attention (Katharopoulos et al., 2020), the baseline.

softmax(q . k) is replaced by phi(q) . phi(k) for a positive feature map phi (elu + 1 by default),
so causal attention becomes a running sum: y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps) with
S_t = sum_{s<=t} phi(k_s) v_s^T and z_t = sum_{s<=t} phi(k_s). The state is (S, z) per head,
(H, Dk, Dv) + (H, Dk), independent of the sequence length. Training uses the chunked form of
``linear_core``; decoding a single token uses the recurrent form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.linear_core import chunked_linear_attention, recurrent_linear_attention

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": lambda x: F.elu(x) + 1.0,  # elu(x) + 1 > 0: the normaliser can never vanish
    "relu": F.relu,
    "identity": lambda x: x,
}


@dataclass(kw_only=True)
class LinearAttentionConfig(MixerConfig):
    n_heads: int = 4
    feature_dim: int | None = None  # Dk per head; None: d_model // n_heads
    feature_map: str = "elu"  # one of FEATURE_MAPS
    normalize: bool = True  # divide by phi(q_t) . sum_{s<=t} phi(k_s)
    eps: float = 1e-6
    chunk_size: int = 64
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n_heads", "chunk_size")
        check_divides(self, "n_heads", "d_model")
        if self.feature_dim is None:
            self.feature_dim = self.d_model // self.n_heads
        check_positive(self, "feature_dim")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"{type(self).__name__}.feature_map must be one of {sorted(FEATURE_MAPS)}, "
                f"got {self.feature_map!r}"
            )
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"{type(self).__name__}.eps must be a positive number, got {self.eps!r}")
        if self.feature_map == "identity" and self.normalize:
            # phi(q) . sum phi(k) can be zero or negative for signed features: dividing by it is unstable.
            raise ValueError(
                f"{type(self).__name__}: feature_map='identity' needs normalize=False (the normaliser "
                "phi(q) . sum phi(k) can cross zero for signed features), got normalize=True"
            )


@register("linear_attention")
class LinearAttention(Mixer):
    """Causal linear attention with feature map elu+1 / relu / identity and a key-sum normaliser."""

    Config = LinearAttentionConfig
    constant_state = True
    test_config = {"n_heads": 2, "feature_dim": 8, "chunk_size": 4}

    def __init__(self, config: LinearAttentionConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads, self.feature_dim = c.n_heads, c.feature_dim
        self.head_dim = c.d_model // c.n_heads
        self.phi = FEATURE_MAPS[c.feature_map]
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.feature_dim, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, c.n_heads * c.feature_dim, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, c.n_heads * self.head_dim, bias=c.bias)
        self.o_proj = nn.Linear(c.n_heads * self.head_dim, c.d_model, bias=c.bias)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        h, f = self.n_heads, self.feature_dim
        return {
            "kv": torch.zeros(batch_size, h, f, self.head_dim, device=device, dtype=dtype),
            "z": torch.zeros(batch_size, h, f, device=device, dtype=dtype),
        }

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T, d_model) -> y: (B, T, d_model); state {"kv": (B, H, Dk, Dv), "z": (B, H, Dk)}."""
        self.check_input(x)
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        h = self.n_heads
        q = self.phi(self.q_proj(x).view(b, t, h, -1).transpose(1, 2))  # (B, H, T, Dk)
        k = self.phi(self.k_proj(x).view(b, t, h, -1).transpose(1, 2))
        v = self.v_proj(x).view(b, t, h, -1).transpose(1, 2)  # (B, H, T, Dv)
        c = self.config
        if t == 1:
            o, kv, z = recurrent_linear_attention(
                q, k, v, state["kv"], state["z"], eps=c.eps, normalize=c.normalize
            )
        else:
            o, kv, z = chunked_linear_attention(
                q, k, v, state["kv"], state["z"], chunk_size=c.chunk_size, eps=c.eps, normalize=c.normalize
            )
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        return y, {"kv": kv, "z": z}
