"""Associative-memory core shared by Titans (MAC, MAG, MAL) and Miras (Moneta, Yaad, Memora).

The memory is a small MLP per head whose weights are learned *at test time*: every token writes a
key/value pair by one step of online optimisation of an attentional-bias objective
``loss(M(k), v)``. The four Miras choices map onto this file as:

- memory architecture: ``mlp_forward`` (``depth`` layers, GELU, optional ``x + LN(MLP(x))``);
- attentional bias (``memlab.mixers.assoc_objectives``, like the retentions): ``LpBias``
  (``||e||_p^p``; p=2 is Titans' ``||M(k) - v||^2``), ``HuberBias`` (Yaad);
- retention: ``DecayRetention`` (Titans / Yaad weight decay), ``LqRetention`` (Moneta's l_q
  stability, W the mirror map of the accumulator), ``KLRetention`` (Memora: weights on the
  probability simplex, updated by a softmax of the retained log-weights);
- learning algorithm: gradient descent with a data-dependent step, optionally with momentum
  (Titans' "surprise" ``S_t = eta_t S_{t-1} - theta_t grad``). Each token's gradient can be
  soft-clipped in norm (``max_grad_norm``, as titans-pytorch offers), which keeps the inner
  optimisation bounded while the outer loop trains.

Every retention rule is linear in an *accumulator* ``A`` from which the weights are read:
``A_t = a_t A_{t-1} + S_t`` (``a_t`` the keep gate), ``W_t = f(A_t)``. For Memora this holds
exactly because softmax ignores a per-column shift, so ``a_t log W_{t-1}`` and ``a_t A_{t-1}``
give the same weights. That makes one chunked parallel form serve all models:

Chunked form (Titans section 3.2, Miras section 5.4). Within a chunk of ``chunk_size`` tokens all
gradients are taken at the memory as of the chunk's start, so they are computed together (batched
over tokens with a hand-written MLP backward pass); the momentum and retention recurrences are
then summed in closed form with cumulative products of the gates, which reduces the whole chunk
to per-token weights on the gradients. Tokens read the memory as of their chunk's start. The chunk
grid is absolute: a partial chunk's keys, values and gates wait in a fixed-size buffer in the
state, and the memory changes only when the chunk completes, so a whole-sequence forward,
chunked calls and token-by-token decoding compute the same function.

Shapes: B batch, H heads, T tokens, N tokens in a chunk, D head dim, Din/Dout one memory layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.assoc_objectives import (
    AttentionalBias,
    Retention,
)
from memlab.mixers.base import MixerConfig, State, check_divides, check_positive

# ---------------------------------------------------------------------------------------------
# The MLP memory, its forward pass and a hand-written backward pass (per token, batched).


def _layer_norm(z: torch.Tensor, eps: float) -> torch.Tensor:
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    return (z - mu) * torch.rsqrt(var + eps)


def _layer_norm_backward(z: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient through a LayerNorm without affine: r (g - mean(g) - y mean(g y))."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    r = torch.rsqrt(var + eps)
    y = (z - mu) * r
    return r * (g - g.mean(-1, keepdim=True) - y * (g * y).mean(-1, keepdim=True))


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; a bare bmm for 3-d operands (the chunk loop folds batch and heads into one dim)."""
    return torch.bmm(a, b) if a.dim() == 3 and b.dim() == 3 else a @ b


def causal_log_mask(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """(n, n): 0 on and below the diagonal, -inf above (added to log-decays before exp)."""
    return torch.full((n, n), -math.inf, dtype=dtype, device=device).triu(1)


@dataclass(frozen=True)
class MLPCache:
    """What the backward pass needs: inputs of every layer and pre-activations."""

    inputs: list[torch.Tensor]
    pre: list[torch.Tensor]


def mlp_forward(
    ws: list[torch.Tensor], x: torch.Tensor, residual_norm: bool, eps: float = 1e-5
) -> tuple[torch.Tensor, MLPCache]:
    """The memory M(x). ws[i]: (B, H, Din_i, Dout_i); x: (B, H, N, D) -> (B, H, N, D).

    ``h_{i} = gelu(h_{i-1} @ W_i)`` between layers (no activation after the last one); with
    ``residual_norm`` the output is ``x + LN(h_L)`` (the TTT / Titans memory block), otherwise
    ``h_L`` (depth 1 then gives the linear memory ``x @ W``).
    """
    inputs, pre = [x], []
    a = x
    for i, w in enumerate(ws):
        z = _mm(a, w)
        pre.append(z)
        if i < len(ws) - 1:
            a = F.gelu(z)
            inputs.append(a)
    out = x + _layer_norm(z, eps) if residual_norm else z
    return out, MLPCache(inputs, pre)


def mlp_backward(
    ws: list[torch.Tensor], cache: MLPCache, g: torch.Tensor, residual_norm: bool, eps: float = 1e-5
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-token gradient factors: for layer i, (input_i (B,H,N,Din), delta_i (B,H,N,Dout)).

    The gradient of token n's loss w.r.t. W_i is ``outer(input_i[n], delta_i[n])``; callers
    contract these with per-token weights instead of materialising N gradients.
    g: (B, H, N, D) is d loss / d M(x) of every token.
    """
    d = _layer_norm_backward(cache.pre[-1], g, eps) if residual_norm else g
    factors: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in reversed(range(len(ws))):
        factors.append((cache.inputs[i], d))
        if i > 0:
            d = torch.ops.aten.gelu_backward(_mm(d, ws[i].transpose(-1, -2)), cache.pre[i - 1])
    return factors[::-1]


def weighted_grads(
    factors: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor
) -> list[torch.Tensor]:
    """sum_n weights[s, n] * grad_n for every layer: weights (S, B, H, N) -> [(S, B, H, Din, Dout)].

    One batched matmul per layer: the S weighted copies of the inputs are laid side by side,
    (B, H, N, S * Din), and contracted with the deltas over the tokens.
    """
    ws = weights.movedim(0, -1)[..., None]  # (B, H, N, S, 1)
    out = []
    for a, d in factors:
        aw = (a.unsqueeze(-2) * ws).flatten(-2)  # (B, H, N, S * Din)
        g = _mm(aw.transpose(-1, -2), d)  # (B, H, S * Din, Dout)
        out.append(g.unflatten(-2, (weights.shape[0], a.shape[-1])).movedim(-3, 0))
    return out


def soft_clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Factor that maps a gradient of norm ``norm`` to norm ``max_norm * tanh(norm / max_norm)``.

    Smooth, close to 1 for small gradients, and never lets one token move the memory by more
    than ``max_norm`` times its step.
    """
    norm = norm.clamp_min(1e-12)
    return max_norm * torch.tanh(norm / max_norm) / norm


# ---------------------------------------------------------------------------------------------
# The core: learned initial memory + one chunk's update in closed form.


class AssocMemory(nn.Module):
    """Per-head MLP memory updated by chunked online optimisation.

    State keys (prefix ``mem.``): ``w{i}`` the accumulator of layer i (B, H, Din_i, Dout_i) and,
    with momentum, ``s{i}`` the momentum ("surprise") of the same shape.
    """

    def __init__(
        self,
        *,
        n_heads: int,
        dim: int,
        depth: int = 2,
        expansion: int = 4,
        residual_norm: bool = True,
        bias: AttentionalBias,
        retention: Retention,
        momentum: bool,
        max_grad_norm: float | None = None,
        loss_mean: bool = False,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.n_heads, self.dim, self.depth = n_heads, dim, depth
        # loss_mean: the bias is averaged over the D value entries (titans-pytorch's MSE) instead
        # of summed, so the step's size and the memory's curvature do not grow with the head dim.
        self.loss_scale = 1.0 / dim if loss_mean else 1.0
        self.max_grad_norm = max_grad_norm
        self.residual_norm, self.momentum, self.ln_eps = residual_norm, momentum, ln_eps
        self.bias, self.retention = bias, retention
        dims = [dim] + [dim * expansion] * (depth - 1) + [dim]
        self.shapes = list(zip(dims[:-1], dims[1:], strict=True))
        # The memory's starting weights are meta-learned by the outer loop (one set per head).
        self.init_acc = nn.ParameterList(
            nn.Parameter(retention.init_accumulator(torch.randn(n_heads, i, o) / math.sqrt(i)))
            for i, o in self.shapes
        )

    def init_state(self, batch_size: int) -> State:
        st: State = {}
        for i, p in enumerate(self.init_acc):
            st[f"mem.w{i}"] = p.unsqueeze(0).expand(batch_size, *p.shape)
            if self.momentum:
                st[f"mem.s{i}"] = torch.zeros(batch_size, *p.shape, device=p.device, dtype=p.dtype)
        return st

    def weights(self, st: State) -> list[torch.Tensor]:
        """The memory weights [(B, H, Din_i, Dout_i)] as of the state."""
        return [self.retention.weights(st[f"mem.w{i}"]) for i in range(self.depth)]

    def evaluate(self, ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Read the memory: x (B, H, N, D) -> M(x) (B, H, N, D)."""
        return mlp_forward(ws, x, self.residual_norm, self.ln_eps)[0]

    def loss(
        self, ws: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, extra: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-token attentional-bias loss (B, H, N) of the pairs (k, v) under weights ws."""
        return self.loss_scale * self.bias.loss(self.evaluate(ws, k) - v, extra)

    def update(
        self,
        st: State,
        k: torch.Tensor,
        v: torch.Tensor,
        log_keep: torch.Tensor,
        lr: torch.Tensor,
        log_mom: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> State:
        """Absorb one complete chunk. k, v: (B, H, N, D); gates (B, H, N); extra (B, H, N, E).

        Token-level rule (gradients g_n taken at the chunk-start weights W_0):
            S_n = eta_n S_{n-1} - theta_n g_n          (without momentum: S_n = -theta_n g_n)
            A_n = a_n A_{n-1} + S_n,                   W = retention(A_N) after the chunk
        with a = exp(log_keep), eta = exp(log_mom), theta = lr. Summed in closed form:
            A_N = P_a(1..N) A_0 + c_S S_0 - sum_n w_n g_n,   S_N = P_eta(1..N) S_0 - sum_n u_n g_n
            w_n = theta_n sum_{i>=n} P_a(i+1..N) P_eta(n+1..i),  u_n = theta_n P_eta(n+1..N),
            c_S = sum_i P_a(i+1..N) P_eta(1..i),
        every product taken as exp of a difference of cumulative log-gates (never a division).
        """
        if self.momentum != (log_mom is not None):
            raise ValueError(f"log_mom must be given exactly when momentum is on (momentum={self.momentum})")
        ws = self.weights(st)
        out, cache = mlp_forward(ws, k, self.residual_norm, self.ln_eps)
        factors = self.grad_factors(ws, cache, out, v, extra)
        accs = [st[f"mem.w{i}"] for i in range(self.depth)]
        moms = [st[f"mem.s{i}"] for i in range(self.depth)] if self.momentum else None
        accs, moms = self.apply(accs, moms, factors, self.coefs(log_keep, lr, log_mom))
        new: State = {f"mem.w{i}": acc for i, acc in enumerate(accs)}
        if moms is not None:
            new.update({f"mem.s{i}": mom for i, mom in enumerate(moms)})
        return new

    def coefs(
        self,
        log_keep: torch.Tensor,
        lr: torch.Tensor,
        log_mom: torch.Tensor | None,
        upper: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The gate-only part of ``update`` for gates (..., N) (any leading dims, e.g. many chunks).

        Returns ``(w, keep_all, c_mom, mom_all)``: w (S, ..., N) the per-token weights of the
        gradients before the soft clip (S = 2 with momentum: accumulator then momentum, else 1),
        the others (..., 1, 1) (c_mom, mom_all None without momentum). They depend on the gates
        only, so a whole sequence's chunks can be done at once, outside the chunk loop.
        ``upper`` (N, N), optional: ``causal_log_mask(N)``, when the caller has it already.
        """
        cum_a = log_keep.cumsum(-1)  # (..., N)
        total_a = cum_a[..., -1:]
        tail_a = total_a - cum_a  # log P_a(n+1..N) <= 0
        keep_all = total_a.exp()[..., None]  # (..., 1, 1)
        if log_mom is None:
            return (lr * tail_a.exp()).unsqueeze(0), keep_all, None, None
        cum_e = log_mom.cumsum(-1)
        n = cum_e.shape[-1]
        # [i, n] = log P_eta(n+1..i) for i >= n, -inf above the diagonal
        if upper is None:
            upper = causal_log_mask(n, cum_e.dtype, cum_e.device)
        decay_mom = (cum_e[..., :, None] - cum_e[..., None, :] + upper).exp()  # (..., N, N)
        w_acc = _mm(tail_a.exp().unsqueeze(-2), decay_mom).squeeze(-2)
        w_mom = decay_mom[..., -1, :]  # P_eta(n+1..N)
        c_mom = (tail_a + cum_e).exp().sum(-1)[..., None, None]
        mom_all = cum_e[..., -1:].exp()[..., None]
        return lr * torch.stack([w_acc, w_mom]), keep_all, c_mom, mom_all

    def grad_factors(
        self,
        ws: list[torch.Tensor],
        cache: MLPCache,
        out: torch.Tensor,
        v: torch.Tensor,
        extra: torch.Tensor | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token gradient factors (see ``mlp_backward``) of the bias at outputs out = M(k)."""
        g = self.bias.scaled_grad(out - v, extra, self.loss_scale)
        return mlp_backward(ws, cache, g, self.residual_norm, self.ln_eps)

    def apply(
        self,
        accs: list[torch.Tensor],
        moms: list[torch.Tensor] | None,
        factors: list[tuple[torch.Tensor, torch.Tensor]],
        coefs: tuple[torch.Tensor, ...],
        norm_in: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """One chunk's closed-form update of accumulators and momenta (see ``update``).

        ``norm_in`` (B, H, N), optional: the norms of the first layer's inputs (the keys),
        when the caller has them already.
        """
        w, keep_all, c_mom, mom_all = coefs
        if self.max_grad_norm is not None:
            # token n's gradient is outer(a_n, d_n) per layer, whose norm is |a_n| |d_n|. Summed
            # as squares with one guarded square root: hypot (and sqrt) have a 0/0 gradient where
            # a token's gradient vanishes in every layer, which turned whole trainings into NaN.
            sq = None
            for i, (a, d) in enumerate(factors):
                na2 = norm_in.square() if i == 0 and norm_in is not None else a.square().sum(-1)
                term = na2 * d.square().sum(-1)
                sq = term if sq is None else sq + term  # (B, H, N)
            norm = sq.clamp_min(1e-24).sqrt()
            w = w * soft_clip_scale(norm, self.max_grad_norm)
        grads = weighted_grads(factors, w)
        renorm = self.retention.renormalize
        if moms is None:
            return [renorm(keep_all * acc - g[0]) for acc, g in zip(accs, grads, strict=True)], None
        new_accs = [
            renorm(keep_all * acc + c_mom * mom - g[0]) for acc, mom, g in zip(accs, moms, grads, strict=True)
        ]
        return new_accs, [mom_all * mom - g[1] for mom, g in zip(moms, grads, strict=True)]


def reference_update(
    core: AssocMemory,
    st: State,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor,
    lr: torch.Tensor,
    log_mom: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> State:
    """The same chunk update applied token by token, gradients from autograd (the test oracle).

    Independent of the closed form: it runs the recurrences of ``AssocMemory.update`` one token
    at a time and takes each token's gradient with ``torch.autograd.grad`` of the bias loss.
    """
    ws0 = [w.detach().requires_grad_(True) for w in core.weights(st)]
    accs = [st[f"mem.w{i}"] for i in range(core.depth)]
    moms = [st[f"mem.s{i}"] for i in range(core.depth)] if log_mom is not None else None
    for n in range(k.shape[2]):
        with torch.enable_grad():
            ex = extra[:, :, n : n + 1] if extra is not None else None
            loss = core.loss(ws0, k[:, :, n : n + 1], v[:, :, n : n + 1], ex).sum()
            grads = torch.autograd.grad(loss, ws0)
        if core.max_grad_norm is not None:
            norm = torch.sqrt(sum(g.pow(2).sum((-2, -1)) for g in grads))
            grads = [g * soft_clip_scale(norm, core.max_grad_norm)[..., None, None] for g in grads]
        a = log_keep[:, :, n].exp()[..., None, None]
        th = lr[:, :, n][..., None, None]
        for i, g in enumerate(grads):
            if moms is not None:
                moms[i] = log_mom[:, :, n].exp()[..., None, None] * moms[i] - th * g
                step = moms[i]
            else:
                step = -th * g
            accs[i] = a * accs[i] + step
    new: State = {f"mem.w{i}": core.retention.renormalize(acc) for i, acc in enumerate(accs)}
    if moms is not None:
        new.update({f"mem.s{i}": m for i, m in enumerate(moms)})
    return new


# ---------------------------------------------------------------------------------------------
# Projections and the chunk scan with a partial-chunk buffer.


class ShortConv(nn.Module):
    """Linear projection, causal depthwise convolution over time, SiLU (Titans / Miras q, k, v).

    The state is the last ``kernel - 1`` projected inputs (B, kernel-1, C); kernel <= 1 means no
    convolution.
    """

    def __init__(self, d_in: int, channels: int, kernel: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, channels, bias=False)
        self.kernel, self.channels = kernel, channels
        if kernel > 1:
            bound = 1.0 / math.sqrt(kernel)
            self.conv = nn.Parameter(torch.empty(channels, 1, kernel).uniform_(-bound, bound))

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(batch_size, max(self.kernel - 1, 0), self.channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d_in) -> (B, T, C) and the new conv state."""
        u = self.proj(x)
        if self.kernel <= 1:
            return F.silu(u), conv_state
        full = torch.cat([conv_state.to(u.dtype), u], dim=1)  # (B, kernel-1+T, C)
        y = F.conv1d(full.transpose(1, 2), self.conv.to(u.dtype), groups=self.channels).transpose(1, 2)
        return F.silu(y), full[:, full.shape[1] - (self.kernel - 1) :]


@dataclass(kw_only=True)
class AssocMemoryConfig(MixerConfig):
    """Options of the neural memory shared by the Titans and Miras mixers."""

    n_heads: int = 4
    chunk_size: int = 64  # tokens per memory update (the grid is absolute)
    mem_depth: int = 2  # MLP layers in the memory
    mem_expansion: int = 4  # hidden width = mem_expansion * head_dim
    # True: the memory is x + LN(MLP(x)) (the TTT / titans-pytorch block). Off by default: on a
    # small CPU MQAR probe the plain MLP learned recall (Yaad 0.44) where the LN form did not (0.04).
    mem_residual_norm: bool = False
    conv_size: int = 4  # causal depthwise conv on q, k, v; 0 or 1 disables it
    # The data-dependent step theta_t lies in (0, lr_max), on the value-averaged bias (below).
    # Stability of the outer gradient: a chunk sums chunk_size gradients taken at the same weights
    # and momentum multiplies the step by ~1/(1 - eta), so the 2-layer memory's chunk map expands
    # (and gradients through it explode) once lr_max/(1 - eta_init) reaches ~2-3 (measured:
    # d_model 128, 2 heads, chunk 64, 2048 tokens). 0.1 with eta 0.9 keeps a margin of ~2.5.
    lr_max: float = 0.1
    # Soft clip of each token's memory-gradient norm (None: off), a safety net for when the outer
    # loop grows the memory: with the value-averaged bias a token's gradient is ~0.1 at init, so
    # the clip at 3 only acts on gradients ~30x larger. (With the summed bias it was what kept
    # titans_mal's weights from reaching 1e19 within 50 MQAR steps.)
    mem_max_grad_norm: float | None = 3.0
    # Average the attentional bias over the D value entries (titans-pytorch's MSE) instead of
    # summing it: the memory's curvature, and so the stable step, does not scale with the head
    # dim. The summed form with lr_max 0.1 made the chunk map expansive (outer gradients grew 2-4x
    # per chunk: titans_mac 2e13 at 2048 tokens).
    mem_loss_mean: bool = True
    # alpha_t at init: the memory keeps 1 - alpha_t per token. Weight decay drives the 2-layer
    # memory into the zero saddle of the MLP, where its gradients vanish; at 1e-2 the reads fell to
    # 0 over 4096 tokens. 5e-4 keeps (1 - alpha)^4096 ~ 0.13 per layer; the gate is data-dependent
    # and the outer loop can raise it.
    mem_forget_init: float = 5e-4
    mem_momentum_init: float = 0.9  # eta_t at init (Titans' momentum; unused without momentum)
    # Run each whole chunk's read and update (``chunk_step``) through torch.compile: the chunk is
    # ~100 small ops, launch-bound on a GPU, and the compiler fuses its elementwise chains. Same
    # function (tested against the eager form); costs a compilation on first use per shape.
    mem_compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n_heads", "chunk_size", "mem_depth", "mem_expansion")
        check_divides(self, "n_heads", "d_model")
        cs = self.conv_size  # bool is an int subclass, but True is not a kernel size
        if not isinstance(cs, int) or isinstance(cs, bool) or cs < 0:
            raise ValueError(f"{type(self).__name__}.conv_size must be an int >= 0, got {self.conv_size!r}")
        if not self.lr_max > 0:
            raise ValueError(f"{type(self).__name__}.lr_max must be > 0, got {self.lr_max!r}")
        for name in ("mem_forget_init", "mem_momentum_init"):
            val = getattr(self, name)
            if not 0 < val < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be in (0, 1), got {val!r}")
        if self.mem_max_grad_norm is not None and not self.mem_max_grad_norm > 0:
            raise ValueError(
                f"{type(self).__name__}.mem_max_grad_norm must be None or > 0, got {self.mem_max_grad_norm!r}"
            )


_COMPILED_STEP = None  # torch.compile(chunk_step), built on first use

# Gate initialisations (step lr_max/2, Huber threshold 1; keep and momentum from the config).
_DELTA_BIAS = 0.5413  # softplus^-1(1)


class NeuralMemory(nn.Module):
    """Projections, data-dependent gates and the chunked scan around an ``AssocMemory``.

    ``queries`` maps a read stream to normalised queries, ``writes`` a write stream to keys,
    values and gates; ``scan`` reads and writes a whole sequence; ``read`` / ``absorb`` let a
    mixer interleave them (MAC writes attention outputs). State keys start with ``mem.``.
    """

    def __init__(
        self,
        *,
        d_in: int,
        n_heads: int,
        head_dim: int,
        chunk_size: int,
        depth: int,
        expansion: int,
        residual_norm: bool,
        conv_size: int,
        lr_max: float,
        bias: AttentionalBias,
        retention: Retention,
        momentum: bool,
        max_grad_norm: float | None = None,
        loss_mean: bool = False,
        forget_init: float = 1e-2,
        momentum_init: float = 0.9,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.chunk_size = n_heads, head_dim, chunk_size
        self.lr_max, self.momentum, self.compiled = lr_max, momentum, compiled
        inner = n_heads * head_dim
        self.q_proj = ShortConv(d_in, inner, conv_size)
        self.kv_proj = ShortConv(d_in, 2 * inner, conv_size)
        # gate channels: log keep, step, [log momentum], [bias extras]
        self.n_gates = 2 + int(momentum) + bias.n_extra
        self.gate_proj = nn.Linear(d_in, n_heads * self.n_gates)
        with torch.no_grad():
            b = self.gate_proj.bias.view(n_heads, self.n_gates)
            b.zero_()
            b[:, 0] = math.log((1 - forget_init) / forget_init)  # sigmoid^-1(1 - alpha)
            if momentum:
                b[:, 2] = math.log(momentum_init / (1 - momentum_init))
            b[:, 2 + int(momentum) :] = _DELTA_BIAS
        self.core = AssocMemory(
            n_heads=n_heads,
            dim=head_dim,
            depth=depth,
            expansion=expansion,
            residual_norm=residual_norm,
            bias=bias,
            retention=retention,
            momentum=momentum,
            max_grad_norm=max_grad_norm,
            loss_mean=loss_mean,
        )

    # -- state ---------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, c: AssocMemoryConfig, *, bias: AttentionalBias, retention: Retention, momentum: bool
    ) -> NeuralMemory:
        """The memory a Titans or Miras mixer describes with its config; the objective varies."""
        return cls(
            d_in=c.d_model,
            n_heads=c.n_heads,
            head_dim=c.d_model // c.n_heads,
            chunk_size=c.chunk_size,
            depth=c.mem_depth,
            expansion=c.mem_expansion,
            residual_norm=c.mem_residual_norm,
            conv_size=c.conv_size,
            lr_max=c.lr_max,
            max_grad_norm=c.mem_max_grad_norm,
            loss_mean=c.mem_loss_mean,
            forget_init=c.mem_forget_init,
            momentum_init=c.mem_momentum_init,
            compiled=c.mem_compile,
            bias=bias,
            retention=retention,
            momentum=momentum,
        )

    def state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # The memory accumulates many small updates: keep it at least in float32.
        return torch.promote_types(dtype, torch.float32)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        sd = self.state_dtype(dtype)
        st = {k: v.to(device=device, dtype=sd) for k, v in self.core.init_state(batch_size).items()}
        h, c, d = self.n_heads, self.chunk_size, self.head_dim
        st["mem.k"] = torch.zeros(batch_size, h, c, d, device=device, dtype=sd)
        st["mem.v"] = torch.zeros(batch_size, h, c, d, device=device, dtype=sd)
        st["mem.g"] = torch.zeros(batch_size, h, c, self.n_gates, device=device, dtype=sd)
        st["mem.n"] = 0  # tokens of the current chunk already buffered
        st["mem.conv_q"] = self.q_proj.init_state(batch_size, device, dtype)
        st["mem.conv_kv"] = self.kv_proj.init_state(batch_size, device, dtype)
        return st

    def _compiled_step(self):  # noqa: ANN202 (a compiled ``chunk_step``)
        # One compiled function per process, shared by every layer: dynamo guards on the core's
        # constants (depth, bias, retention), so layers of one model reuse one graph.
        global _COMPILED_STEP
        if _COMPILED_STEP is None:
            _COMPILED_STEP = torch.compile(chunk_step)
        return _COMPILED_STEP

    # -- projections ---------------------------------------------------------------------------
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, -1).transpose(1, 2)

    def queries(self, x: torch.Tensor, conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d_in) -> unit-norm queries (B, H, T, D) and the new conv state."""
        q, conv_state = self.q_proj(x, conv_state)
        return F.normalize(self._heads(q), dim=-1), conv_state

    def writes(
        self, x: torch.Tensor, conv_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, d_in) -> keys (unit norm), values (B, H, T, D), gates (B, H, T, G), conv state."""
        kv, conv_state = self.kv_proj(x, conv_state)
        k, v = self._heads(kv).chunk(2, dim=-1)
        pre = self._heads(self.gate_proj(x))  # (B, H, T, G)
        parts = [F.logsigmoid(pre[..., 0]), self.lr_max * torch.sigmoid(pre[..., 1])]
        if self.momentum:
            parts.append(F.logsigmoid(pre[..., 2]))
        parts.extend(F.softplus(pre[..., j]) for j in range(2 + int(self.momentum), self.n_gates))
        return F.normalize(k, dim=-1), v, torch.stack(parts, dim=-1), conv_state

    # -- memory --------------------------------------------------------------------------------
    def read(self, st: State, q: torch.Tensor) -> torch.Tensor:
        """q: (B, H, N, D) -> M(q) with the memory as of the current chunk's start."""
        ws = self.core.weights(st)
        return self.core.evaluate(ws, q.to(ws[0].dtype))

    def _update(self, st: State, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> State:
        mom = g[..., 2] if self.momentum else None
        extra = g[..., 2 + int(self.momentum) :] if self.n_gates > 2 + int(self.momentum) else None
        return self.core.update(st, k, v, g[..., 0], g[..., 1], mom, extra)

    def absorb(self, st: State, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> State:
        """Append M <= chunk_size - n tokens (B, H, M, .) to the pending chunk; update when full."""
        n, m, c = st["mem.n"], k.shape[2], self.chunk_size
        if n + m > c:
            raise ValueError(f"absorb: {m} tokens do not fit the {c - n} left in the chunk")
        sd = st["mem.k"].dtype
        k, v, g = k.to(sd), v.to(sd), g.to(sd)
        st = dict(st)
        if n == 0 and m == c:  # a whole chunk at once: no need to go through the buffer
            st.update(self._update(st, k, v, g))
            return st
        bufs = {}
        for name, new in (("mem.k", k), ("mem.v", v), ("mem.g", g)):
            old = st[name]
            bufs[name] = torch.cat([old[:, :, :n], new, old[:, :, n + m :]], dim=2)
        if n + m < c:
            st.update(bufs)
            st["mem.n"] = n + m
            return st
        st.update(self._update(st, bufs["mem.k"], bufs["mem.v"], bufs["mem.g"]))
        for name in ("mem.k", "mem.v", "mem.g"):
            st[name] = torch.zeros_like(st[name])
        st["mem.n"] = 0
        return st

    def pieces(self, n_pending: int, t: int) -> list[tuple[int, int]]:
        """Split t new tokens at the absolute chunk boundaries: [(start, length)]."""
        out, i, n = [], 0, n_pending
        while i < t:
            m = min(self.chunk_size - n, t - i)
            out.append((i, m))
            i, n = i + m, (n + m) % self.chunk_size
        return out

    def scan(self, x: torch.Tensor, st: State) -> tuple[torch.Tensor, State]:
        """Read then write every token of x (B, T, d_in): returns M(q) (B, H, T, D) and the state.

        A Python loop over chunks only; within a chunk reads and the update are batched. Whole
        chunks on the grid go through ``scan_chunks``; a partial chunk at either end through the
        buffer (``read`` / ``absorb``).
        """
        st = dict(st)
        q, st["mem.conv_q"] = self.queries(x, st["mem.conv_q"])
        k, v, g, st["mem.conv_kv"] = self.writes(x, st["mem.conv_kv"])
        sd = st["mem.k"].dtype
        q, k, v, g = q.to(sd), k.to(sd), v.to(sd), g.to(sd)
        c, t = self.chunk_size, x.shape[1]
        outs, i = [], 0
        if st["mem.n"]:  # finish the pending chunk first
            m = min(c - st["mem.n"], t)
            outs.append(self.read(st, q[:, :, :m]))
            st = self.absorb(st, k[:, :, :m], v[:, :, :m], g[:, :, :m])
            i = m
        n_full = (t - i) // c
        if n_full:
            j = i + n_full * c
            reads, new = self.scan_chunks(st, q[:, :, i:j], k[:, :, i:j], v[:, :, i:j], g[:, :, i:j])
            outs.append(reads)
            st.update(new)
            i = j
        if i < t:
            outs.append(self.read(st, q[:, :, i:]))
            st = self.absorb(st, k[:, :, i:], v[:, :, i:], g[:, :, i:])
        return torch.cat(outs, dim=2).to(x.dtype), st

    def scan_chunks(
        self, st: State, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """Whole chunks (the buffer empty): q, k, v (B, H, C*N, D), g (B, H, C*N, G) in the state dtype.

        Everything that does not depend on the memory (gate coefficients, key norms, the layout
        of reads and keys) is computed once for all C chunks; the loop holds only the memory's
        forward on [queries | keys] at the chunk-start weights, its backward and the update.
        Returns the reads (B, H, C*N, D) and the new memory entries of the state.
        """
        core, c = self.core, self.chunk_size
        b, h, t, d = q.shape
        n_chunks = t // c

        def chunked(u: torch.Tensor) -> torch.Tensor:  # (B, H, C*N, E) -> (B*H, C, N, E)
            return u.reshape(b * h, n_chunks, c, u.shape[-1])

        qk = torch.cat([chunked(q), chunked(k)], dim=2).unbind(1)  # C x (B*H, 2N, D)
        vs = chunked(v).unbind(1)
        gc = chunked(g)
        mom = gc[..., 2] if self.momentum else None
        w, keep_all, c_mom, mom_all = core.coefs(gc[..., 0], gc[..., 1], mom)
        none = [None] * n_chunks
        ws_c = w.unbind(2)
        keep_c = keep_all.unbind(1)
        c_mom_c = c_mom.unbind(1) if c_mom is not None else none
        mom_all_c = mom_all.unbind(1) if mom_all is not None else none
        e0 = 2 + int(self.momentum)
        extras = gc[..., e0:].unbind(1) if self.n_gates > e0 else none
        k_norm = (
            torch.linalg.vector_norm(chunked(k), dim=-1).unbind(1) if core.max_grad_norm is not None else none
        )
        accs = [st[f"mem.w{i}"].reshape(b * h, *core.shapes[i]) for i in range(core.depth)]
        moms = (
            [st[f"mem.s{i}"].reshape(b * h, *core.shapes[i]) for i in range(core.depth)]
            if self.momentum
            else None
        )
        step = self._compiled_step() if self.compiled else chunk_step
        reads = []
        for j in range(n_chunks):
            coefs = (ws_c[j], keep_c[j], c_mom_c[j], mom_all_c[j])
            read, accs, moms = step(core, accs, moms, qk[j], vs[j], coefs, extras[j], k_norm[j])
            reads.append(read)
        new: State = {f"mem.w{i}": acc.reshape(b, h, *acc.shape[1:]) for i, acc in enumerate(accs)}
        if moms is not None:
            new.update({f"mem.s{i}": mom.reshape(b, h, *mom.shape[1:]) for i, mom in enumerate(moms)})
        return torch.cat(reads, dim=1).view(b, h, t, d), new


def chunk_step(
    core: AssocMemory,
    accs: list[torch.Tensor],
    moms: list[torch.Tensor] | None,
    qk: torch.Tensor,
    v: torch.Tensor,
    coefs: tuple[torch.Tensor | None, ...],
    extra: torch.Tensor | None,
    k_norm: torch.Tensor | None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
    """One whole chunk of ``NeuralMemory.scan_chunks``: read with the chunk-start memory, then update.

    qk: (B*H, 2N, D), the chunk's queries then its keys; v (B*H, N, D); coefs from
    ``AssocMemory.coefs`` for this chunk; extra (B*H, N, E) or None; k_norm (B*H, N) or None.
    Returns the reads (B*H, N, D) and the new accumulators and momenta. A free function of tensors
    (and the core's constants) so that ``torch.compile`` can fuse it as one graph.
    """
    n = v.shape[1]
    ws = [core.retention.weights(a) for a in accs]
    out, cache = mlp_forward(ws, qk, core.residual_norm, core.ln_eps)
    kcache = MLPCache([u[:, n:] for u in cache.inputs], [u[:, n:] for u in cache.pre])
    factors = core.grad_factors(ws, kcache, out[:, n:], v, extra)
    accs, moms = core.apply(accs, moms, factors, coefs, k_norm)
    return out[:, :n], accs, moms


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)
