"""The neural memory as a layer: projections, data-dependent gates and the chunked scan around the
associative-memory core (``memlab.mixers.assoc_memory``), shared by Titans and Miras mixers.

``NeuralMemory`` maps a stream to unit-norm queries, keys, values and gates (through ``ShortConv``),
reads the memory as of each chunk's start and writes whole chunks through ``chunk_step``; a
partial chunk waits in a fixed-size buffer in the state, so a whole-sequence forward, chunked
calls and token-by-token decoding compute the same function. ``AssocMemoryConfig`` holds the
options every Titans and Miras mixer shares.

Shapes: B batch, H heads, T tokens, N tokens in a chunk, D head dim.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.assoc_memory import AssocMemory, chunk_step
from memlab.mixers.assoc_objectives import AttentionalBias, Retention
from memlab.mixers.base import MixerConfig, State, check_divides, check_positive

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


# ``mem_compile``: compiled copies of the memory's chunk steps, one per static signature.
# Dynamo caches its graphs on the function's *code object* and, past
# ``torch._dynamo.config.recompile_limit`` (8) graphs for it, runs that function eagerly for the
# rest of the process. One compiled ``chunk_step`` shared by every layer of every mixer collected
# a graph per objective, memory depth, momentum on/off (None arguments), grad mode, requires_grad
# pattern of the state (first chunk vs the rest) and stride layout of the per-chunk views (which
# moved with the sequence length), so a benchmark that ran Titans and then Moneta hit the limit
# and timed Moneta mostly eager. Hence:
# (1) each static signature (the function, the core's constants, grad mode, batch size, ...) gets
#     its own copy of the function with a fresh code object, i.e. its own cache and its own
#     limit; layers and mixers of one signature still share its graphs;
# (2) the compiled path gets contiguous per-chunk tensors (``contiguous_chunks``), whose strides do
#     not depend on the length, so no shape or stride of a chunk step depends on the length;
# (3) the copies compile with static shapes (``dynamic=False``; the batch size is in the key):
#     dynamo's automatic-dynamic record is kept per function name and line, i.e. shared by the
#     copies, so one copy's batch size turned the others' graphs dynamic, and dynamic graphs guard
#     on duck-sized storage offsets of the per-chunk views (``cs.storage_offset() ==
#     q.storage_offset()``), which recompiled again. Static graphs also give inductor fixed shapes.
# What remains within a signature is 1-3 graphs (the first chunk's state has no requires_grad or
# another layout). Raising the global limit instead would change it for every compiled function
# of the process and leave the count unbounded (it grew with each mixer, length and batch size).
# (Newer torch.compile's ``isolate_recompiles`` does (1) too; the copy works on every torch.)
_COMPILED: dict[tuple, Callable] = {}


def compiled(fn: Callable, key: tuple) -> Callable:
    """``torch.compile`` of a private copy of fn (own code object: own dynamo cache), one per key."""
    out = _COMPILED.get((fn, *key))
    if out is None:
        code = fn.__code__.replace()  # a new code object: what dynamo keys its cache on
        copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
        out = _COMPILED[(fn, *key)] = torch.compile(copy, dynamic=False)
    return out


def contiguous_chunks(parts: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """Per-chunk views (of one tensor, strides that depend on the chunk count) -> contiguous ones."""
    return parts if parts[0] is None else torch.stack(parts).unbind(0)


def static_key(obj: object) -> tuple:
    """The class and plain attributes (numbers, flags, strings) of an objective: what dynamo guards on."""
    plain = (bool, int, float, str, type(None))
    return (type(obj), *sorted((k, v) for k, v in vars(obj).items() if isinstance(v, plain)))


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

    def _compiled_step(self, batch_size: int):  # noqa: ANN202 (a compiled ``chunk_step``)
        # One compiled copy per static signature (see ``compiled``): the shapes, what dynamo guards
        # on as constants or None-ness (the core's objective, depth, flags) and the grad mode;
        # layers and mixers that share them reuse its graphs.
        core = self.core
        key = (
            batch_size * self.n_heads, self.momentum, self.chunk_size, tuple(core.shapes),
            core.residual_norm, core.ln_eps,
            core.loss_scale, core.max_grad_norm, static_key(core.bias), static_key(core.retention),
            torch.is_grad_enabled(),
        )  # fmt: skip
        return compiled(chunk_step, key)

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
        if self.compiled:  # strides independent of the length: one graph for every length
            qk, vs, ws_c, keep_c, c_mom_c, mom_all_c, extras, k_norm = map(
                contiguous_chunks, (qk, vs, ws_c, keep_c, c_mom_c, mom_all_c, extras, k_norm)
            )
        step = self._compiled_step(b) if self.compiled else chunk_step
        reads = []
        for j in range(n_chunks):
            coefs = (ws_c[j], keep_c[j], c_mom_c[j], mom_all_c[j])
            read, accs, moms = step(core, accs, moms, qk[j], vs[j], coefs, extras[j], k_norm[j])
            reads.append(read)
        new: State = {f"mem.w{i}": acc.reshape(b, h, *acc.shape[1:]) for i, acc in enumerate(accs)}
        if moms is not None:
            new.update({f"mem.s{i}": mom.reshape(b, h, *mom.shape[1:]) for i, mom in enumerate(moms)})
        return torch.cat(reads, dim=1).view(b, h, t, d), new


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)
