"""Miras (Behrouz et al. 2025): Moneta, Yaad and Memora on the shared associative-memory core.

Each model is one choice of attentional bias and retention for ``NeuralMemory`` (see
``neural_memory``); the memory is a 2-layer MLP ``W2 gelu(W1 x)`` per head (expansion 4; the
paper's ``x + LN(...)`` block is ``mem_residual_norm=True``, off by default because it did not learn
recall in our MQAR probe), learned at test time by gradient descent with data-dependent step
``eta_t`` and keep gate ``alpha_t`` (both per head and token), in the chunked parallel form:

- ``moneta``: l_p attentional bias ``||M(k) - v||_p^p`` (``p``, default 3) with l_q memory
  stability (``q``, default 4): ``A_t = alpha_t A_{t-1} - eta_t grad`` and W the mirror map of A
  for the retention ``c/2 ||W||_q^2`` (``LqRetention``: the paper's ``A / ||A||_q^(q-2)`` is singular
  as A decays and diverged in training; ``c = n^(1 - 2/q)`` for n entries makes the map's gain
  O(1), as for q = 2, instead of ~sqrt(n) / 3 = 40-70 for a 64 x 256 matrix at q = 4).
- ``yaad``: Huber attentional bias with a data-dependent threshold ``delta_t``: an L2 step while
  ``||M(k) - v||_2 <= delta_t``, else ``delta_t`` times an L1 (sign) step; weight-decay retention
  ``W_t = alpha_t W_{t-1} - eta_t grad``.
- ``memora``: L2 attentional bias with KL retention: every column of every memory matrix lies on
  the simplex (scaled by ``simplex_scale``), ``W_t = c softmax(alpha_t log W_{t-1} - eta_t grad)``.

The block follows the paper's (modern linear-RNN) layout: q, k, v projections with a short causal
convolution and SiLU, unit-norm q and k, the memory read, a per-head RMSNorm and an output gate
``sigmoid(x W_g)``, then the output projection. The paper makes eta, alpha (and delta) channel-wise
through a low-rank projection; here they are one scalar per head and token, as in Titans.

State: memory weights + the partial chunk's buffer (fixed size) + conv tails; constant in T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.assoc_objectives import (
    AttentionalBias,
    DecayRetention,
    HuberBias,
    KLRetention,
    LpBias,
    LqRetention,
    Retention,
)
from memlab.mixers.base import Mixer, State, register
from memlab.mixers.neural_memory import AssocMemoryConfig, NeuralMemory, merge_heads


@dataclass(kw_only=True)
class MonetaConfig(AssocMemoryConfig):
    # Without momentum the step is not amplified across chunks: at d_model 128, 2 heads, chunk 64
    # the outer gradient stayed ~20 up to lr_max 8 and exploded at 32 (Moneta and Yaad).
    lr_max: float = 2.0
    p: float = 3.0  # l_p attentional bias (p >= 1; below 2 |e| is smoothed as sqrt(e^2 + eps))
    q: float = 4.0  # l_q retention (q > 1; q = 2 is plain weight decay)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.p >= 1:
            raise ValueError(f"{type(self).__name__}.p must be >= 1, got {self.p!r}")
        if not self.q > 1:
            raise ValueError(f"{type(self).__name__}.q must be > 1, got {self.q!r}")


@dataclass(kw_only=True)
class YaadConfig(AssocMemoryConfig):
    lr_max: float = 2.0  # as Moneta's
    # The Huber objective already bounds each token's pull (delta_t sign(e) past the threshold),
    # and the extra clip slowed learning: on the CPU MQAR probe recall reached 0.83 without it
    # (600 steps) and 0.18 with a clip at 3 (300 steps; 0.44 unclipped at 300; both measured with
    # the summed bias).
    mem_max_grad_norm: float | None = None
    # delta_t at init (the Huber threshold on ||M(k) - v||_2; the paper gives no value). Past it
    # the step is delta_t sign(e), which moves every one of the D outputs by lr * delta_t whatever
    # the error's size: at 1, with values of norm ~3-5, every write is such an L1 step and the
    # memory did not learn MQAR recall (0.04, depth 1, summed bias); at 100 (the L2 regime, the
    # delta rule) it did (0.87). See docs/results.md, "Memory mixers on the CPU".
    huber_delta_init: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.huber_delta_init > 0:
            raise ValueError(
                f"{type(self).__name__}.huber_delta_init must be > 0, got {self.huber_delta_init!r}"
            )


@dataclass(kw_only=True)
class MemoraConfig(AssocMemoryConfig):
    simplex_scale: float = 1.0  # c: every memory column sums to c
    # The step moves log-weights (a mirror step), whose useful size is O(1) per token; Euclidean
    # steps on weights of size 1/Din are much smaller. On the CPU MQAR probe the linear Memora
    # learned better with steps up to 10 (acc 0.17) than up to 1 (0.11), on the summed bias. On
    # the value-averaged one (64x smaller gradients at head dim 64) the outer gradient at d_model
    # 128, 2 heads, chunk 64 stayed ~25 up to 100 and reached 2e5 at 640 (= 10 summed).
    lr_max: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.simplex_scale > 0:
            raise ValueError(f"{type(self).__name__}.simplex_scale must be > 0, got {self.simplex_scale!r}")


class _Miras(Mixer):
    """The Miras block around a ``NeuralMemory`` without momentum; subclasses pick the objective."""

    test_config = {"n_heads": 4, "chunk_size": 4, "mem_expansion": 2}

    def objective(self) -> tuple[AttentionalBias, Retention]:
        raise NotImplementedError

    def __init__(self, config: AssocMemoryConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads, self.head_dim = c.n_heads, c.d_model // c.n_heads
        bias, retention = self.objective()
        self.memory = NeuralMemory.from_config(c, bias=bias, retention=retention, momentum=False)
        self.norm = nn.Parameter(torch.ones(c.n_heads, 1, self.head_dim))
        self.gate = nn.Linear(c.d_model, c.d_model)
        self.out = nn.Linear(c.d_model, c.d_model, bias=False)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        return self.memory.init_state(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        st = self.init_state(x.shape[0], x.device, x.dtype) if state is None else dict(state)
        reads, st = self.memory.scan(x, st)  # (B, H, T, D)
        o = F.rms_norm(reads, (self.head_dim,)) * self.norm
        return self.out(merge_heads(o) * torch.sigmoid(self.gate(x))), st


@register("moneta")
class Moneta(_Miras):
    """l_p attentional bias, l_q retention."""

    Config = MonetaConfig

    def objective(self) -> tuple[AttentionalBias, Retention]:
        return LpBias(self.config.p), LqRetention(self.config.q)


@register("yaad")
class Yaad(_Miras):
    """Huber attentional bias with a data-dependent threshold, weight-decay retention."""

    Config = YaadConfig

    def __init__(self, config: YaadConfig) -> None:
        super().__init__(config)
        mem = self.memory
        with torch.no_grad():  # the threshold's gate channel: softplus(bias) = huber_delta_init
            d = torch.tensor(float(config.huber_delta_init), dtype=torch.float64)
            mem.gate_proj.bias.view(mem.n_heads, mem.n_gates)[:, -1] = float(d + torch.log(-torch.expm1(-d)))

    def objective(self) -> tuple[AttentionalBias, Retention]:
        return HuberBias(), DecayRetention()


@register("memora")
class Memora(_Miras):
    """L2 attentional bias, KL retention (memory on the probability simplex)."""

    Config = MemoraConfig

    def objective(self) -> tuple[AttentionalBias, Retention]:
        return LpBias(2.0), KLRetention(self.config.simplex_scale)
