"""Mamba (Gu & Dao, 2023): the selective state-space mixer (S6) with a chunked parallel scan.

Per token, with E = expand * d_model channels and N = d_state states per channel:

    x, z   = in_proj(u)                                  (B, T, E) each
    x      = silu(causal_depthwise_conv(x))              kernel d_conv
    dt     = softplus(dt_proj(x W_dt))                   (B, T, E), rank dt_rank = ceil(d_model / 16)
    B_t    = x W_B,  C_t = x W_C                         (B, T, N) each, shared by all channels
    A      = -exp(A_log)                                 (E, N), S4D-real init A[e, n] = -(n + 1)
    h_t    = exp(dt_t A) * h_{t-1} + dt_t B_t x_t        (B, E, N): ZOH for A, Euler for B
    y_t    = C_t . h_t + D * x_t
    out    = out_proj(y * silu(z))

The decay exp(dt_t A) lies in (0, 1) per channel and state, and it depends on the input: that
selectivity is what separates Mamba from S4. Because the decay differs for every (e, n) pair,
the recurrence does not factor into matrix products the way Mamba-2 or linear attention do, so
the training form here is a scan:

- the sequence is cut into chunks of ``chunk_size`` tokens and the (B, E, N) state is carried
  from one chunk to the next (a Python loop over chunks, never over tokens);
- inside a chunk the first-order recurrence h_t = a_t h_{t-1} + b_t is solved by a log-depth
  (Hillis-Steele) associative scan over the pairs (a, b); it only ever multiplies decays in
  (0, 1], never divides by a cumulative decay, so it cannot overflow whatever dt is;
- with ``checkpoint`` on, each chunk's (B, L, E, N) intermediates are recomputed in the backward
  pass instead of stored, so training memory is O(T * (E + N)) plus one chunk's worth.

Decoding (T = 1) runs the recurrent step itself. The chunk grid does not change the function (the
scan is exact), so any split of a sequence into calls gives the same output.

State (constant size): the last d_conv - 1 conv inputs (B, E, d_conv - 1) and h (B, E, N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from memlab.mixers.base import Mixer, MixerConfig, State, check_positive, register
from memlab.ops import scan as fused_scan


@dataclass(kw_only=True)
class MambaConfig(MixerConfig):
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16), the paper's "auto"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False
    chunk_size: int = 64
    checkpoint: bool = True  # recompute each chunk's scan in backward (memory O(T), ~1.3x compute)
    # "auto": the fused Triton scan (memlab.ops.scan) on CUDA, the chunked PyTorch scan elsewhere;
    # "triton": the fused scan wherever its kernels run (CUDA, or the CPU under TRITON_INTERPRET=1);
    # "torch": the chunked PyTorch scan (the reference) everywhere.
    scan: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        check_positive(self, "d_state", "d_conv", "expand", "dt_rank", "chunk_size")
        for name in ("dt_min", "dt_max", "dt_init_floor", "dt_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive number, got {value!r}")
        if self.scan not in ("auto", "triton", "torch"):
            raise ValueError(
                f"{type(self).__name__}.scan must be 'auto', 'triton' or 'torch', got {self.scan!r}"
            )
        if self.dt_min > self.dt_max:
            raise ValueError(
                f"{type(self).__name__}.dt_min={self.dt_min} must not exceed dt_max={self.dt_max}"
            )


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tail: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution that continues from the inputs of an earlier call.

    x: (B, E, T); weight: (E, 1, K); bias: (E,) or None; tail: (B, E, K - 1), the K - 1 inputs
    before x (zeros at the start of a sequence, which is exactly left zero-padding).
    Returns y (B, E, T) with y[t] = bias + sum_j weight[j] * x[t - K + 1 + j], and the new tail.
    """
    k = weight.shape[-1]
    xp = torch.cat([tail, x], dim=-1)  # (B, E, K - 1 + T)
    y = F.conv1d(xp, weight, bias, groups=x.shape[1])
    return y, xp[..., xp.shape[-1] - (k - 1) :]


def _scan_chunk(
    u: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    bm: torch.Tensor,
    cm: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the selective scan, without the D skip.

    u, dt: (B, L, E); a: (E, N) (negative); bm, cm: (B, L, N); h0: (B, E, N).
    Returns y (B, L, E) and the state after the chunk (B, E, N).
    """
    decay = torch.exp(dt.unsqueeze(-1) * a)  # (B, L, E, N), in (0, 1]
    inp = (dt * u).unsqueeze(-1) * bm.unsqueeze(2)  # (B, L, E, N)
    # Fold the incoming state into the first element, so the inclusive scan yields h directly.
    first = inp[:, :1] + decay[:, :1] * h0.unsqueeze(1)
    h = torch.cat([first, inp[:, 1:]], dim=1)
    length = h.shape[1]
    step = 1
    # Hillis-Steele: after the pass with offset `step`, element i holds the composition of the
    # (up to) 2 * step elements ending at i, and decay[i] the product of their decays. Products of
    # numbers in (0, 1] can only underflow towards 0, which is the right limit, never overflow.
    while step < length:
        # F.pad with (step, -step) on the time axis shifts by `step`: element i meets element
        # i - step; the first `step` elements meet the fill (0 for h, 1 for the decay product).
        h = h + decay * F.pad(h, (0, 0, 0, 0, step, -step))
        if 2 * step < length:  # the last pass needs no decay products after it
            decay = decay * F.pad(decay, (0, 0, 0, 0, step, -step), value=1.0)
        step *= 2
    y = torch.einsum("blen,bln->ble", h, cm)
    return y, h[:, -1]


def selective_scan(
    u: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    bm: torch.Tensor,
    cm: torch.Tensor,
    d: torch.Tensor,
    h0: torch.Tensor,
    chunk_size: int = 64,
    checkpoint: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The S6 recurrence over a whole sequence, chunked.

    u, dt: (B, T, E); a: (E, N); bm, cm: (B, T, N); d: (E,); h0: (B, E, N).
    Computes h_t = exp(dt_t a) * h_{t-1} + dt_t bm_t u_t and y_t = cm_t . h_t + d * u_t.
    Returns y (B, T, E) and h_T (B, E, N).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    h = h0
    ys = []
    recompute = checkpoint and torch.is_grad_enabled()
    for start in range(0, u.shape[1], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (u[:, sl], dt[:, sl], a, bm[:, sl], cm[:, sl], h)
        if recompute:
            y, h = torch_checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    return torch.cat(ys, dim=1) + u * d, h


def selective_step(
    u: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    bm: torch.Tensor,
    cm: torch.Tensor,
    d: torch.Tensor,
    h: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step. u, dt: (B, E); a: (E, N); bm, cm: (B, N); h: (B, E, N) -> y (B, E), h."""
    h = torch.exp(dt.unsqueeze(-1) * a) * h + (dt * u).unsqueeze(-1) * bm.unsqueeze(1)
    return (h * cm.unsqueeze(1)).sum(-1) + d * u, h


@register("mamba")
class Mamba(Mixer):
    """Selective SSM block (Mamba-1): conv + data-dependent (dt, B, C) scan, gated by silu(z)."""

    Config = MambaConfig
    constant_state = True
    test_config = {"d_state": 4, "chunk_size": 4}

    def __init__(self, config: MambaConfig) -> None:
        super().__init__(config)
        c = config
        e, n, r = c.expand * c.d_model, c.d_state, c.dt_rank
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        self.in_proj = nn.Linear(c.d_model, 2 * e, bias=c.bias)
        self.conv = nn.Conv1d(e, e, c.d_conv, groups=e, bias=c.conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.out_proj = nn.Linear(e, c.d_model, bias=c.bias)
        # S4D-real: A[e, n] = -(n + 1), stored as its log so that A stays negative in training.
        a_init = torch.arange(1, n + 1).to(torch.get_default_dtype())
        self.A_log = nn.Parameter(torch.log(a_init).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        # As in the reference implementation, A and D are not weight-decayed: decay would pull every
        # A towards -1 and erase the S4D spread of time scales. Optimisers may honour this flag.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._init_dt()

    @torch.no_grad()
    def _init_dt(self) -> None:
        """The paper's dt init: softplus(bias) log-uniform in [dt_min, dt_max], small random W_dt."""
        c = self.config
        std = c.dt_rank**-0.5 * c.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        lo, hi = math.log(c.dt_min), math.log(c.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (hi - lo) + lo).clamp(min=c.dt_init_floor)
        # Inverse of softplus: dt + log(1 - exp(-dt)).
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        e = self.d_inner
        return {
            "conv": torch.zeros(batch_size, e, self.config.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, e, self.d_state, device=device, dtype=dtype),
        }

    def ssm_inputs(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xc: (B, T, E), the conv output after silu -> dt (B, T, E) > 0, B (B, T, N), C (B, T, N)."""
        dt_low, bm, cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt_low)), bm, cm

    def decays(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token decays exp(dt_t A) for x (B, T, d_model) from a fresh state: (B, T, E, N)."""
        self.check_input(x)
        xs = self.in_proj(x).chunk(2, dim=-1)[0]
        tail = x.new_zeros(x.shape[0], self.d_inner, self.config.d_conv - 1)
        xc = F.silu(causal_conv1d(xs.transpose(1, 2), self.conv.weight, self.conv.bias, tail)[0])
        dt = self.ssm_inputs(xc.transpose(1, 2))[0]
        return torch.exp(dt.unsqueeze(-1) * -torch.exp(self.A_log))

    def _fused(self, xc: torch.Tensor) -> bool:
        """Whether this call runs the fused Triton scan (see MambaConfig.scan)."""
        mode = self.config.scan
        if mode == "torch" or xc.dtype not in fused_scan.DTYPES:
            return False
        runnable = xc.is_cuda or (xc.device.type == "cpu" and fused_scan.interpreting())
        if mode == "triton":
            if not (runnable and fused_scan.kernels_available()):
                raise ValueError(
                    f"MambaConfig.scan='triton' needs CUDA or TRITON_INTERPRET=1 and working Triton kernels; "
                    f"got a {xc.device.type} tensor"
                )
            return True
        # auto: only on CUDA (the interpreter is for tests, far slower than the PyTorch scan)
        return xc.is_cuda and fused_scan.kernels_available()

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        xc, conv_tail = causal_conv1d(xs.transpose(1, 2), self.conv.weight, self.conv.bias, state["conv"])
        xc = F.silu(xc).transpose(1, 2)  # (B, T, E)
        dt, bm, cm = self.ssm_inputs(xc)
        a = -torch.exp(self.A_log)
        if t == 1:
            y, h = selective_step(xc[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0], self.D, state["ssm"])
            y = y.unsqueeze(1)
        elif self._fused(xc):
            y, h = fused_scan.selective_scan(xc, dt, a, bm, cm, self.D, h0=state["ssm"], return_state=True)
            h = h.to(state["ssm"].dtype)
        else:
            y, h = selective_scan(
                xc, dt, a, bm, cm, self.D, state["ssm"], self.config.chunk_size, self.config.checkpoint
            )
        out = self.out_proj(y * F.silu(z))
        return out, {"conv": conv_tail, "ssm": h}
