"""flash2 on one GPU: correctness first, then every variant timed in this one process.

    PYTHONPATH=. python benchmarks/flash2.py --mode full --out benchmarks/results/flash2.json

Sections (``--mode full``):
- ``check``: the Triton kernels against the PyTorch reference on the GPU (output and gradients;
  windows, sinks, per-head windows, varlen, GQA, ragged decode), tolerance 2x plain bf16 PyTorch.
- ``fa``: the FlashAttention protocol, bf16, B*S = 16k, H*D = 2048, D in {64, 128}, S in {1k, 4k,
  16k}, causal and not; forward, backward, forward+backward TFLOP/s for flash2, SDPA's FLASH,
  CUDNN and EFFICIENT backends and compiled FlexAttention.
- ``gqa``: GQA 32/8, D = 128, causal, S in {4k, 16k}.
- ``window``: sliding windows of 1k and 4k at S in {8k, 16k, 32k} against FlexAttention with a
  block mask; FLOPs count only the visible (query, key) pairs.
- ``decode``: GQA 32/8, D = 128, (B, L) in {(1, 128k), (8, 32k), (64, 4k)}: microseconds and TB/s
  of KV read against SDPA and FlexAttention decoding, and ragged per-head lengths.
``--mode smoke`` runs the checks and a tile-size sweep of the flash2 kernels instead.

Timing: CUDA events around each call, calls queued back to back, median of ``--rep`` (>= 20)
after warm-up. Compilation (Triton kernels, torch.compile of FlexAttention) is done first by
worker processes that run every timed variant once, so that this process finds it all cached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F

from memlab.ops.attention import attention, attention_reference, decode, decode_reference

BF16 = torch.bfloat16
K = 1024
# Every (shape, mask) of FlexAttention is a recompilation of one function; past dynamo's default
# limit of 8 it silently runs eagerly (the full score matrix), which is not the Flex we compare to.
for _name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
              "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)


# ----------------------------------------------------------------------------------------------
# timing and bookkeeping


def time_ms(
    fn: Callable[..., Any], rep: int, warmup: int = 3, setup: Callable[[], Any] | None = None
) -> float:
    """Median milliseconds of ``fn`` over ``rep`` calls queued back to back (CUDA events).

    With ``setup``, each call is ``fn(setup())`` and only ``fn`` lies between the events (a
    backward pass timed after its own, untimed, forward)."""
    for _ in range(warmup):
        fn(setup()) if setup else fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        arg = setup() if setup else None
        start.record()
        fn(arg) if setup else fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


class Graphed:
    """``calls`` back-to-back calls of ``fn`` captured in one CUDA graph on first use, then replayed.

    Timing the replay measures the GPU work of a decoding step without the host's launch time
    (what a serving loop that replays graphs pays); ``run_case`` divides by ``calls``."""

    def __init__(self, fn: Callable[[], Any], calls: int = 10) -> None:
        self.fn, self.calls, self.graph = fn, calls, None

    def __call__(self) -> None:
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for _ in range(self.calls):
                    self.fn()
        self.graph.replay()


@dataclass
class Run:
    args: argparse.Namespace
    records: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.time)

    def add(self, **rec: Any) -> None:
        rec["t"] = round(time.time() - self.t0, 1)
        self.records.append(rec)
        value = rec.get("tflops", rec.get("tbps", rec.get("ok", rec.get("error"))))
        head = f"[{rec['t']:6.1f}s] {rec.get('name', '')} {rec.get('mode', '')}"
        print(f"{head}: {rec.get('ms', '')} ms {value}", flush=True)

    def save(self, extra: dict[str, Any]) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**extra, "records": self.records}, indent=1))


def environment() -> dict[str, Any]:
    import triton

    from memlab.ops.attention import triton as kernels

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
        "flash2_fwd_config": {d: kernels.fwd_config(d, True, False).__dict__ for d in (64, 128)},
        "flash2_bwd_config": {d: {"dkdv": kernels.bwd_config(d, False).dkdv.__dict__,
                                  "dq": kernels.bwd_config(d, False).dq.__dict__} for d in (64, 128)},
    }


def attn_flops(b: int, h: int, t: int, s: int, d: int, pairs: float | None = None) -> float:
    """Forward FLOPs: 4 * D per visible (query, key) pair (two matmuls), B * H heads."""
    if pairs is None:
        pairs = t * s
    return 4.0 * b * h * d * pairs


def causal_pairs(t: int) -> float:
    return t * t / 2  # the FlashAttention convention (x0.5), not t(t+1)/2


def window_pairs(t: int, w: int) -> float:
    return float(sum(min(i + 1, w) for i in range(t)))


# ----------------------------------------------------------------------------------------------
# implementations under test; all take (B, S, H, D) tensors


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v, causal, gqa=False):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=gqa
            ).transpose(1, 2)

    return fn


_FLEX: dict[str, Any] = {}


def _flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _block_mask(kind: str, s: int, window: int = 0):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (kind, s, window)
    if key not in _FLEX:
        if kind == "causal":
            def mod(b, h, qi, ki):
                return qi >= ki
        else:
            def mod(b, h, qi, ki):
                return (qi >= ki) & (qi - ki < window)
        _FLEX[key] = create_block_mask(mod, None, None, s, s, device="cuda", _compile=True)
    return _FLEX[key]


def flex_attn(q, k, v, causal, gqa=False, window=0):
    s = q.shape[1]
    mask = None
    if window:
        mask = _block_mask("window", s, window)
    elif causal:
        mask = _block_mask("causal", s)
    return _flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                   enable_gqa=gqa).transpose(1, 2)


def flash2(q, k, v, causal, gqa=False, window=0):
    return attention(q, k, v, causal=causal, window=window or None)


IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "flash2": flash2,
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "flex": flex_attn,
}


# ----------------------------------------------------------------------------------------------
# the benchmark plan: a list of cases, each run once by a warm-up worker and timed by the main


@dataclass
class Case:
    section: str
    impl: str
    b: int
    s: int
    h: int
    hkv: int
    d: int
    causal: bool = True
    window: int = 0
    decode_tq: int = 0  # > 0: a decode case with this many queries
    ragged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.section, self.impl, f"B{self.b}", f"S{self.s}", f"H{self.h}/{self.hkv}", f"D{self.d}"]
        if self.decode_tq == 0:
            parts.append("causal" if self.causal else "full")
        if self.window:
            parts.append(f"w{self.window}")
        if self.ragged:
            parts.append("ragged")
        if self.extra:
            parts.append(",".join(f"{k}={v}" for k, v in sorted(self.extra.items())))
        return " ".join(parts)


def plan(mode: str) -> list[Case]:
    cases: list[Case] = []
    if mode == "extra":  # a short rerun: decode with the shipped split rule, windows vs compiled Flex
        for b, length in ((1, 128 * K), (8, 32 * K), (64, 4 * K)):
            for impl in ("flash2", "sdpa"):
                cases.append(Case("decode", impl, b, length, 32, 8, 128, decode_tq=1))
            cases.append(Case("decode", "flash2", b, length, 32, 8, 128, decode_tq=1, ragged=True))
        # Flex with a block mask compiles for about a minute (create_block_mask, then the kernel).
        for s in (16 * K,):
            for w in (1 * K, 4 * K):
                for impl in ("flash2", "flex"):
                    cases.append(
                        Case("window", impl, 1, s, 16, 16, 128, True, window=w, extra={"fwd_only": 1})
                    )
        return cases
    if mode == "smoke":
        for d, h in ((64, 32), (128, 16)):
            for causal in (True, False):
                for cfg in FWD_SWEEP[d]:
                    cases.append(Case("sweep_fwd", "flash2", 4, 4 * K, h, h, d, causal, extra={"cfg": cfg}))
        for cfg in DECODE_SWEEP:
            for b, length in ((1, 128 * K), (8, 32 * K), (64, 4 * K)):
                cases.append(
                    Case("sweep_decode", "flash2", b, length, 32, 8, 128, decode_tq=1, extra={"cfg": cfg})
                )
        for impl in ("sdpa_flash", "sdpa_cudnn"):
            for causal in (True, False):
                cases.append(Case("fa", impl, 4, 4 * K, 16, 16, 128, causal))
        for impl in ("sdpa", "sdpa_flash", "sdpa_efficient"):
            cases.append(Case("decode", impl, 1, 128 * K, 32, 8, 128, decode_tq=1))
        # Last: a backward that faults takes the process (and the CUDA context) with it.
        for d, h in ((128, 16), (64, 32)):
            for cfg in BWD_SWEEP[d]:
                cases.append(Case("sweep_bwd", "flash2", 4, 4 * K, h, h, d, True, extra={"cfg": cfg}))
        return cases
    for s in (4 * K, 16 * K, 1 * K):
        for causal in (True, False):
            for impl in IMPLS:
                cases.append(Case("fa", impl, 16 * K // s, s, 16, 16, 128, causal))
    for b, length in ((1, 128 * K), (8, 32 * K), (64, 4 * K)):
        for impl in ("flash2", "sdpa", "sdpa_flash", "flex"):
            cases.append(Case("decode", impl, b, length, 32, 8, 128, decode_tq=1))
        cases.append(Case("decode", "flash2", b, length, 32, 8, 128, decode_tq=1, ragged=True))
    for s in (8 * K, 16 * K, 32 * K):
        for w in (1 * K, 4 * K):
            for impl in ("flash2", "flex"):
                cases.append(Case("window", impl, 1, s, 16, 16, 128, True, window=w))
    for s in (4 * K, 16 * K):
        for impl in ("flash2", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"):
            cases.append(Case("gqa", impl, 16 * K // s, s, 32, 8, 128, True))
    for s in (4 * K, 16 * K, 1 * K):
        for causal in (True, False):
            for impl in IMPLS:
                cases.append(Case("fa", impl, 16 * K // s, s, 32, 32, 64, causal))
    return cases


# Tile sweeps of --mode smoke: (block_m, block_n, warps, stages).
FWD_SWEEP = {
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)],
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 4)],
}
# (dkdv config, dq config)
BWD_SWEEP = {
    128: [((32, 128, 8, 3), (128, 64, 8, 3)), ((32, 128, 8, 2), (128, 64, 8, 2)),
          ((64, 128, 8, 2), (128, 64, 8, 3)), ((32, 128, 8, 3), (128, 32, 4, 3)),
          ((32, 64, 4, 3), (64, 64, 4, 3))],
    64: [((64, 128, 8, 3), (128, 64, 8, 3)), ((64, 64, 4, 3), (128, 64, 8, 3)),
         ((32, 128, 4, 3), (128, 64, 4, 3)), ((64, 128, 8, 2), (128, 128, 8, 2))],
}
GROUP_LOOP = [0]  # the dK/dV kernel's walk over GQA heads in the sweeps (--group-loop)
# (block_n, warps, stages, programs per SM)
DECODE_SWEEP = [(64, 4, 3, 4), (128, 4, 3, 4), (64, 4, 4, 8), (128, 8, 3, 4), (64, 4, 3, 2)]


def _inputs(c: Case, seed: int = 0, grad: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tq = c.decode_tq or c.s
    q = torch.randn(c.b, tq, c.h, c.d, device="cuda", dtype=BF16, generator=g)
    k = torch.randn(c.b, c.s, c.hkv, c.d, device="cuda", dtype=BF16, generator=g)
    v = torch.randn(c.b, c.s, c.hkv, c.d, device="cuda", dtype=BF16, generator=g)
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v


def _ragged_lengths(c: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if not c.ragged:
        return torch.full((c.b, c.hkv), c.s, dtype=torch.int32, device="cuda")
    lo = c.s // 8
    return torch.randint(lo, c.s + 1, (c.b, c.hkv), generator=g, dtype=torch.int32).cuda()


def _cfgs(c: Case):
    from memlab.ops.attention import triton as kernels

    cfg = c.extra.get("cfg")
    if c.section == "sweep_fwd":
        return kernels.Config(*cfg)
    if c.section == "sweep_bwd":
        return kernels.BwdConfig(kernels.Config(*cfg[0]), kernels.Config(*cfg[1]), group_loop=GROUP_LOOP[0])
    return cfg


def callables(c: Case) -> dict[str, Callable[[], Any]]:
    """mode -> a no-argument function that runs this case once (inputs allocated here)."""
    from memlab.ops.attention import triton as kernels
    from memlab.ops.attention.decode_triton import decode_fwd

    if c.decode_tq:
        q, k, v = _inputs(c)
        lengths = _ragged_lengths(c)
        if c.section == "sweep_decode":
            bn, w, st, pps = c.extra["cfg"]
            return {"decode": lambda: decode_fwd(q, k, v, lengths, scale=c.d**-0.5, window=None, sinks=0,
                                                 block_n=bn, num_warps=w, num_stages=st, programs_per_sm=pps)}
        if c.impl == "flash2":
            def step():
                return decode(q, k, v, lengths, check_lengths=False)

            return {"decode": step, "decode_checked": lambda: decode(q, k, v, lengths),
                    "decode_graph": Graphed(step)}
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if c.impl.startswith("sdpa"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            if c.impl == "sdpa":  # PyTorch's own choice of backend
                def sdpa_step():
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

                return {"decode": sdpa_step, "decode_graph": Graphed(sdpa_step)}
            backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                       "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}

            def run_sdpa():
                with sdpa_kernel(backend[c.impl]):
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

            return {"decode": run_sdpa}
        if c.impl == "flex":
            flex = _flex()
            return {"decode": lambda: flex(qt, kt, vt, enable_gqa=True)}
        raise ValueError(c.impl)
    q, k, v = _inputs(c, grad=True)
    do = torch.randn_like(q)
    gqa = c.hkv != c.h
    scale = c.d**-0.5
    if c.section == "sweep_fwd":
        cfg = _cfgs(c)
        return {"fwd": lambda: kernels.attention_fwd(
            q, k, v, causal=c.causal, scale=scale, window=None, sinks=0, head_windows=None, cu_seqlens=None,
            max_seqlen=0, config=cfg)}
    if c.section == "sweep_bwd":
        cfg = _cfgs(c)
        with torch.no_grad():
            o, lse = kernels.attention_fwd(q, k, v, causal=c.causal, scale=scale, window=None, sinks=0,
                                           head_windows=None, cu_seqlens=None, max_seqlen=0)
        return {"bwd": lambda: kernels.attention_bwd(do, q, k, v, o, lse, causal=c.causal, scale=scale,
                                                     window=None, sinks=0, head_windows=None, cu_seqlens=None,
                                                     max_seqlen=0, config=cfg)}
    impl = IMPLS[c.impl]
    kwargs: dict[str, Any] = {"gqa": gqa} if gqa else {}
    if c.window:
        kwargs["window"] = c.window

    def fwd():  # the training forward (inputs require grad), as in the FlashAttention protocol
        return impl(q, k, v, c.causal, **kwargs)

    if c.extra.get("fwd_only"):
        def fwd_inference():
            with torch.no_grad():
                return impl(q, k, v, c.causal, **kwargs)

        return {"fwd_nograd": fwd_inference}

    def bwd(o):  # o from an untimed forward (see time_ms); compiled Flex forbids retain_graph
        return torch.autograd.grad(o, (q, k, v), do)

    bwd.setup = fwd  # type: ignore[attr-defined]

    def fwd_bwd():
        o = impl(q, k, v, c.causal, **kwargs)
        return torch.autograd.grad(o, (q, k, v), do)

    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd_bwd}


def case_flops(c: Case) -> float:
    if c.window:
        pairs = window_pairs(c.s, c.window)
    elif c.causal:
        pairs = causal_pairs(c.s)
    else:
        pairs = float(c.s * c.s)
    return attn_flops(c.b, c.h, c.s, c.s, c.d, pairs)


# ----------------------------------------------------------------------------------------------
# correctness on the GPU


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().norm().item()
    return (got.double() - ref.double()).norm().item() / max(scale, 1e-30)


def check(run: Run) -> bool:
    """flash2 against the float32 reference and plain bf16 PyTorch (both computed on the GPU)."""
    ok_all = True
    cases = [
        ("causal-gqa4", dict(b=2, t=1000, s=1000, h=8, hkv=2, d=128), {}),
        ("causal-d64-mqa", dict(b=1, t=777, s=777, h=8, hkv=1, d=64), {}),
        ("noncausal-s!=t", dict(b=2, t=300, s=1100, h=4, hkv=4, d=128), dict(causal=False)),
        ("chunked-prefill", dict(b=1, t=256, s=1500, h=8, hkv=2, d=128), {}),
        ("window-sinks", dict(b=1, t=1500, s=1500, h=4, hkv=2, d=128), dict(window=300, sinks=4)),
        ("head-windows", dict(b=1, t=1200, s=1200, h=4, hkv=1, d=64),
         dict(head_windows=[-1, 64, 500, 1], sinks=2)),
        ("varlen", dict(b=1, t=1500, s=1500, h=4, hkv=2, d=128),
         dict(cu_seqlens=[0, 1, 300, 1029, 1500], window=200)),
    ]
    for name, shp, opts in cases:
        try:
            g = torch.Generator(device="cuda").manual_seed(len(name))
            q = torch.randn(shp["b"], shp["t"], shp["h"], shp["d"], device="cuda", dtype=BF16, generator=g)
            k = torch.randn(shp["b"], shp["s"], shp["hkv"], shp["d"], device="cuda", dtype=BF16, generator=g)
            v = torch.randn_like(k)
            do = torch.randn_like(q)
            o_opts = dict(opts)
            if "cu_seqlens" in o_opts:
                o_opts["cu_seqlens"] = torch.tensor(o_opts["cu_seqlens"], dtype=torch.int32, device="cuda")
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            o = attention(*xs, **o_opts)
            grads = torch.autograd.grad(o, xs, do)
            refs = [x.float().requires_grad_() for x in (q, k, v)]
            o32 = attention_reference(*refs, **o_opts)
            g32 = torch.autograd.grad(o32, refs, do.float())
            nv = [x.clone().requires_grad_() for x in (q, k, v)]
            o16 = attention_reference(*nv, upcast=False, **o_opts)
            g16 = torch.autograd.grad(o16, nv, do)
            errs = {"o": (_err(o, o32), _err(o16, o32))}
            for label, a, r, n in zip(("dq", "dk", "dv"), grads, g32, g16, strict=True):
                errs[label] = (_err(a, r), _err(n, r))
            finite = all(torch.isfinite(x).all().item() for x in (o, *grads))
            ok = finite and all(e <= 2 * n + 1e-6 for e, n in errs.values())
            ok_all &= ok
            run.add(section="check", name=name, ok=ok, finite=finite,
                    errors={k_: [f"{e:.2e}", f"{n:.2e}"] for k_, (e, n) in errs.items()})
        except Exception as exc:  # a broken case is recorded, the run goes on
            ok_all = False
            run.add(section="check", name=name, ok=False, error=repr(exc)[:500])
            traceback.print_exc()
    for name, (b, tq, h, hkv, d, smax), opts in [
        ("decode-ragged", (4, 1, 32, 8, 128, 5000), {}),
        ("decode-spec4-window", (2, 4, 32, 8, 128, 3000), dict(window=512, sinks=4)),
    ]:
        try:
            g = torch.Generator(device="cuda").manual_seed(b * smax)
            q = torch.randn(b, tq, h, d, device="cuda", dtype=BF16, generator=g)
            kc = torch.randn(b, smax, hkv, d, device="cuda", dtype=BF16, generator=g)
            vc = torch.randn_like(kc)
            lengths = torch.randint(0, smax + 1, (b, hkv), device="cuda", dtype=torch.int32, generator=g)
            lengths[0, 0] = smax
            o = decode(q, kc, vc, lengths, **opts)
            o32 = decode_reference(q.float(), kc.float(), vc.float(), lengths, **opts)
            o16 = decode_reference(q, kc, vc, lengths, upcast=False, **opts)
            e, n = _err(o, o32), _err(o16, o32)
            ok = bool(torch.isfinite(o).all().item()) and e <= 2 * n + 1e-6
            ok_all &= ok
            run.add(section="check", name=name, ok=ok, errors={"o": [f"{e:.2e}", f"{n:.2e}"]})
        except Exception as exc:
            ok_all = False
            run.add(section="check", name=name, ok=False, error=repr(exc)[:500])
            traceback.print_exc()
    return ok_all


# ----------------------------------------------------------------------------------------------
# main


def run_case(run: Run, c: Case, rep: int) -> None:
    try:
        fns = callables(c)
    except Exception as exc:
        run.add(section=c.section, name=c.name, impl=c.impl, error=repr(exc)[:300])
        return
    for mode, fn in fns.items():
        rec: dict[str, Any] = dict(
            section=c.section, name=c.name, impl=c.impl, mode=mode, B=c.b, S=c.s, H=c.h, Hkv=c.hkv, D=c.d,
            causal=c.causal, window=c.window, ragged=c.ragged, cfg=c.extra.get("cfg"),
        )
        try:
            ms = time_ms(fn, rep, setup=getattr(fn, "setup", None)) / getattr(fn, "calls", 1)
        except Exception as exc:
            rec["error"] = repr(exc)[:300]
            run.add(**rec)
            torch.cuda.empty_cache()
            continue
        rec["ms"] = round(ms, 4)
        if c.decode_tq:
            lengths = _ragged_lengths(c)
            kv_bytes = 2 * int(lengths.sum()) * c.d * 2
            rec["us"] = round(ms * 1e3, 1)
            rec["tbps"] = round(kv_bytes / (ms * 1e-3) / 1e12, 3)
        else:
            mult = {"fwd": 1.0, "fwd_nograd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
            rec["tflops"] = round(mult * case_flops(c) / (ms * 1e-3) / 1e12, 1)
        run.add(**rec)
    torch.cuda.empty_cache()


def warm_worker(mode: str, index: int, count: int) -> None:
    """Run this worker's share of the cases once, so that compilations land in the disk caches."""
    for i, c in enumerate(plan(mode)):
        if i % count != index:
            continue
        t = time.time()
        try:
            for fn in callables(c).values():
                setup = getattr(fn, "setup", None)
                fn(setup()) if setup else fn()
            torch.cuda.synchronize()
            print(f"[warm {index}] {c.name}: {time.time() - t:.1f}s", flush=True)
        except Exception as exc:
            print(f"[warm {index}] {c.name}: {exc!r}"[:300], flush=True)
        torch.cuda.empty_cache()


def prewarm(mode: str, workers: int, timeout_s: float, check_out: str | None) -> float:
    """Compile workers, and the correctness check (its own process) beside them."""
    t = time.time()
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, "--mode", mode, "--warm-worker", f"{i}/{workers}",
                          "--group-loop", str(GROUP_LOOP[0])], env=env)
        for i in range(workers)
    ]
    if check_out:
        procs.append(subprocess.Popen([sys.executable, __file__, "--check-only", check_out,
                                       "--group-loop", str(GROUP_LOOP[0])], env=env))
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout_s - (time.time() - t)))
        except subprocess.TimeoutExpired:
            print(f"prewarm worker {p.pid} past {timeout_s}s: stopped", flush=True)
            p.kill()
    return time.time() - t


def summary(run: Run) -> None:
    print("\n=== summary ===")
    for r in run.records:
        if r.get("section") == "check":
            print(f"check {r['name']:24s} ok={r['ok']} {r.get('errors', r.get('error'))}")
    for r in run.records:
        if r.get("section") == "check":
            continue
        val = r.get("tflops", r.get("tbps"))
        unit = "TFLOP/s" if "tflops" in r else "TB/s"
        extra = f" {r['us']:.1f}us" if "us" in r else ""
        print(f"{r['name']:70s} {r.get('mode', ''):14s} {r.get('ms', float('nan')):9.3f} ms "
              f"{val if val is not None else r.get('error', '')} {unit}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["smoke", "full", "extra"], default="full")
    ap.add_argument("--out", default="benchmarks/results/flash2.json")
    ap.add_argument("--rep", type=int, default=25)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--warm-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--group-loop", type=int, default=0, help="dK/dV GQA loop variant in the smoke sweeps")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop timing new cases after this many seconds")
    ap.add_argument("--prewarm-s", type=float, default=150.0, help="longest wait for the compile workers")
    args = ap.parse_args()
    GROUP_LOOP[0] = args.group_loop
    if args.group_loop:
        from memlab.ops.attention import triton as kernels

        default_bwd_config = kernels.bwd_config

        def bwd_config(d: int, interpret: bool):
            cfg = default_bwd_config(d, interpret)
            return kernels.BwdConfig(cfg.dkdv, cfg.dq, cfg.preprocess_block, args.group_loop)

        kernels.bwd_config = bwd_config
    if args.rep < 20:
        raise SystemExit(f"--rep must be >= 20 for a median worth reporting, got {args.rep}")
    if args.warm_worker:
        i, n = map(int, args.warm_worker.split("/"))
        warm_worker(args.mode, i, n)
        return
    if args.check_only:
        run = Run(args)
        ok = check(run)
        Path(args.check_only).write_text(json.dumps({"checks_ok": ok, "records": run.records}))
        return
    run = Run(args)
    env = environment()
    print(json.dumps(env), flush=True)
    check_path = str(Path(args.out).with_suffix(".check.json"))
    if args.skip_check:
        check_path = None
    warm_s = prewarm(args.mode, max(args.workers, 0), args.prewarm_s, check_path)
    checks_ok = None
    if check_path:
        try:
            checked = json.loads(Path(check_path).read_text())
            checks_ok = checked["checks_ok"]
            for rec in checked["records"]:
                run.add(**{k: v for k, v in rec.items() if k != "t"})
        except (OSError, ValueError, KeyError) as exc:
            run.add(section="check", name="check process", ok=False, error=f"no check results: {exc!r}")
            checks_ok = False
    run.save({"env": env, "checks_ok": checks_ok})
    print(f"prewarm + check {warm_s:.1f}s, checks ok: {checks_ok}", flush=True)
    for c in plan(args.mode):
        if time.time() - run.t0 > args.budget_s:
            run.add(section=c.section, name=c.name, impl=c.impl, error="skipped: time budget")
            continue
        run_case(run, c, args.rep)
        run.save({"env": env, "checks_ok": checks_ok, "prewarm_s": round(warm_s, 1)})
    run.save({"env": env, "checks_ok": checks_ok, "prewarm_s": round(warm_s, 1),
              "total_s": round(time.time() - run.t0, 1)})
    summary(run)


if __name__ == "__main__":
    main()
