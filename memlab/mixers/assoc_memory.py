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
chunked calls and token-by-token decoding compute the same function. The projections, gates,
that buffer and the scan over chunks are ``memlab.mixers.neural_memory``; this file is the core.

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
from memlab.mixers.base import State

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
