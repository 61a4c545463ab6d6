"""Gated Associative Memory (Acharya, 2025): a causal depthwise convolution path, an associative
memory path, and learned sigmoid gates that fuse them, all O(T).

As the paper and its reference code define the block's mixing part (the block's LayerNorm,
residual and feed-forward network are what memlab's LM puts around every mixer):

    local  = causal_depthwise_conv(x)                 kernel ``conv_kernel`` (paper: 3), with bias
    scores = x M^T                                    M: (n_slots, d_model) learned memory bank
    global = softmax(scores) M                        (paper: 512 slots, Xavier-uniform init)
    g_l, g_g = split(W_g x + b_g)                     one linear layer, two gates of width d_model
    y      = sigmoid(g_l) * local + sigmoid(g_g) * global

The two gates are independent sigmoids, not g and 1 - g: each path is switched on or off on its
own, per token and per channel (both fully on gives the plain sum of the two paths).

What the associative memory is, and what it is not: M is a parameter, shared by every sequence
and never written by the tokens. The "global" path of token t is a function of x_t alone, a
softmax lookup into a fixed table, i.e. a per-token layer like an MLP; it carries no
information from one token to another. Only the convolution mixes tokens, over the last
``conv_kernel`` positions, so one GAM layer sees at most conv_kernel - 1 tokens back and a stack
of L layers L * (conv_kernel - 1). Recall of anything further back (MQAR keys, a passkey) is
impossible by construction; the benchmark shows it. This is the paper's design, implemented
faithfully on purpose.

State (constant size): the last conv_kernel - 1 inputs of the convolution, (B, d_model, K - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_positive, register
from memlab.mixers.mamba import causal_conv1d


@dataclass(kw_only=True)
class GAMConfig(MixerConfig):
    conv_kernel: int = 3
    n_slots: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "conv_kernel", "n_slots")


@register("gam")
class GatedAssociativeMemory(Mixer):
    """Causal depthwise conv (local) + softmax lookup into a learned memory bank (per token), gated."""

    Config = GAMConfig
    constant_state = True
    test_config = {"conv_kernel": 3, "n_slots": 16}

    def __init__(self, config: GAMConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.conv = nn.Conv1d(d, d, config.conv_kernel, groups=d, bias=True)
        self.memory = nn.Parameter(torch.empty(config.n_slots, d))
        nn.init.xavier_uniform_(self.memory)
        self.gate = nn.Linear(d, 2 * d)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        k = self.config.conv_kernel
        return {"conv": torch.zeros(batch_size, self.d_model, k - 1, device=device, dtype=dtype)}

    def local_path(self, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D), tail: (B, D, K - 1) -> causal conv output (B, T, D) and the new tail."""
        y, tail = causal_conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, tail)
        return y.transpose(1, 2), tail

    def memory_path(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> softmax(x M^T) M, (..., D); token-wise, independent of other tokens."""
        weights = torch.softmax(x @ self.memory.T, dim=-1)  # (..., n_slots)
        return weights @ self.memory

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        local, tail = self.local_path(x, state["conv"])
        g_local, g_global = self.gate(x).chunk(2, dim=-1)
        y = torch.sigmoid(g_local) * local + torch.sigmoid(g_global) * self.memory_path(x)
        return y, {"conv": tail}
