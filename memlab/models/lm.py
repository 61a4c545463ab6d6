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
    # Kernel of a short causal depthwise convolution sub-layer before each mixer (0: none). It
    # is zoology's "hybrid" short conv: it hands every mixer the previous tokens, so recall is
    # not gated on first learning a previous-token head. Applied to every mixer alike.
    short_conv: int = 0
    # Std of the token embeddings. 0.02 (GPT-2's value) left token identity too small beside the
    # mixer and MLP outputs: a 2-layer attention LM stayed at chance on small MQAR for 800+ steps,
    # while 0.3 solved it in 400 (1.0 was slow again). Measured on CPU, V 64, L 32-64, d_model 64.
    embed_init_std: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.short_conv, int) or self.short_conv < 0:
            raise ValueError(f"LMConfig.short_conv must be an int >= 0, got {self.short_conv!r}")
        for name in ("vocab_size", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if not self.layers:
            raise ValueError("LMConfig.layers must list at least one layer spec, got []")
        for i, spec in enumerate(self.layers):
            if not isinstance(spec, dict) or "mixer" not in spec:
                raise ValueError(f"LMConfig.layers[{i}] must be a dict with a 'mixer' key, got {spec!r}")


class ShortConv(nn.Module):
    """Causal depthwise convolution over time; its state is the last ``kernel - 1`` inputs."""

    def __init__(self, d_model: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D), tail: (B, kernel - 1, D) or None -> y: (B, T, D), new tail."""
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        full = torch.cat([tail, x], dim=1)  # (B, kernel - 1 + T, D)
        y = self.conv(full.transpose(1, 2)).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.kernel - 1) :]


class Block(nn.Module):
    def __init__(self, config: LMConfig, spec: dict[str, Any]) -> None:
        super().__init__()
        options = {k: v for k, v in spec.items() if k != "mixer"}
        self.short_conv: ShortConv | None = None
        if config.short_conv:
            self.norm0 = nn.RMSNorm(config.d_model, eps=config.norm_eps)
            self.short_conv = ShortConv(config.d_model, config.short_conv)
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
        if self.short_conv is None:
            h, state = self.mixer(self.norm1(x), state=state)
        else:
            # The layer state holds the conv tail beside the mixer's own state.
            c, tail = self.short_conv(self.norm0(x), None if state is None else state["conv"])
            x = x + c
            h, inner = self.mixer(self.norm1(x), state=None if state is None else state["mixer"])
            state = {"conv": tail, "mixer": inner}
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        inner = self.mixer.init_state(batch_size, device, dtype)
        if self.short_conv is None:
            return inner
        d = self.mixer.d_model
        tail = torch.zeros(batch_size, self.short_conv.kernel - 1, d, device=device, dtype=dtype)
        return {"conv": tail, "mixer": inner}


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
        nn.init.normal_(self.embed.weight, std=config.embed_init_std)

    @classmethod
    def from_mixer(
        cls,
        mixer: str,
        *,
        vocab_size: int,
        d_model: int,
        n_layers: int = 2,
        short_conv: int = 0,
        mixer_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> LM:
        """The same mixer in every layer (the zoology MQAR model is 2 such layers).

        Mixer options go in ``mixer_options`` when one is named like an argument here (MemMamba
        has its own ``n_layers``), or as keywords otherwise.
        """
        layers = [{"mixer": mixer, **(mixer_options or {}), **options} for _ in range(n_layers)]
        return cls(
            LMConfig(vocab_size=vocab_size, d_model=d_model, layers=layers, short_conv=short_conv)
        )

    def init_states(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> list[State]:
        return [b.init_state(batch_size, device, dtype) for b in self.blocks]

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
        # Generation is inference: in training mode a routing mixer would move its cluster
        # centroids with every generated token. The caller's mode is restored afterwards.
        was_training = self.training
        self.eval()
        try:
            logits, states = self(ids)
            out = [ids]
            for i in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(nxt)
                if i < max_new_tokens - 1:  # the last token's logits are never used
                    logits, states = self(nxt, states=states)
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
