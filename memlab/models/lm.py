"""A decoder-only language model assembled from one mixer spec per layer.

Each block is pre-norm: x + mixer(norm(x)), then optionally x + mlp(norm(x)). Positions come from
the mixers themselves (rotary in attention, recurrence in SSMs), so the model has no absolute
position table and can run at lengths it was not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memlab import mixers
from memlab.mixers.base import State


@dataclass(kw_only=True)
class LMConfig:
    """``layers``: one dict per layer, ``{"mixer": slug, **mixer options}``."""

    vocab_size: int
    d_model: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    mlp: bool = True
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if not self.layers:
            raise ValueError("LMConfig.layers must list at least one layer spec, got []")
        for i, spec in enumerate(self.layers):
            if not isinstance(spec, dict) or "mixer" not in spec:
                raise ValueError(f"LMConfig.layers[{i}] must be a dict with a 'mixer' key, got {spec!r}")


class Block(nn.Module):
    def __init__(self, config: LMConfig, spec: dict[str, Any]) -> None:
        super().__init__()
        options = {k: v for k, v in spec.items() if k != "mixer"}
        self.norm1 = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = mixers.build(spec["mixer"], d_model=config.d_model, **options)
        self.mlp: nn.Module | None = None
        if config.mlp:
            hidden = config.mlp_ratio * config.d_model
            self.norm2 = nn.RMSNorm(config.d_model, eps=config.norm_eps)
            self.mlp = nn.Sequential(
                nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model)
            )

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        h, state = self.mixer(self.norm1(x), state=state)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state


class LM(nn.Module):
    """Token ids (B, T) -> logits (B, T, V), with one mixer state per layer."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, spec) for spec in config.layers)
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)

    @classmethod
    def from_mixer(
        cls, mixer: str, *, vocab_size: int, d_model: int, n_layers: int = 2, **options: Any
    ) -> LM:
        """The same mixer in every layer (the zoology MQAR model is 2 such layers)."""
        layers = [{"mixer": mixer, **options} for _ in range(n_layers)]
        return cls(LMConfig(vocab_size=vocab_size, d_model=d_model, layers=layers))

    def init_states(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> list[State]:
        return [b.mixer.init_state(batch_size, device, dtype) for b in self.blocks]

    def forward(
        self, ids: torch.Tensor, *, states: list[State] | None = None
    ) -> tuple[torch.Tensor, list[State]]:
        """ids: (B, T) int64 -> logits (B, T, V) and the states after the last token."""
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be (B, T) int64, got shape {tuple(ids.shape)} dtype {ids.dtype}")
        if states is not None and len(states) != len(self.blocks):
            raise ValueError(f"states must hold {len(self.blocks)} layer states, got {len(states)}")
        x = self.embed(ids)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if states is None else states[i])
            new_states.append(s)
        return self.head(self.norm(x)), new_states

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: one prefill, then one token at a time through the mixer states.

        ids: (B, T) -> (B, T + max_new_tokens). The prefix is never recomputed.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        logits, states = self(ids)
        out = [ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits, states = self(nxt, states=states)
        return torch.cat(out, dim=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
