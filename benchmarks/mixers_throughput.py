"""Training throughput of every registered mixer at 2k and 8k tokens, against attention, in one process.

Each mixer is one layer at d_model 512 (heads of dimension 64 where the mixer has heads), bf16
parameters and inputs; one step is forward + backward of the whole (B, T, d_model) batch with a
fixed random output gradient, and batches hold 16k tokens (B = 8 at 2k, B = 2 at 8k). Steps are
timed with CUDA events after warm-up (median of up to 10); tokens/s = B * T / median step time.
Every mixer's row is kept: a mixer that fails (out of memory, an unsupported dtype, a bug) is
recorded with its error, and a mixer that would overrun the time budget is recorded as skipped.

    python benchmarks/mixers_throughput.py --out DIR            # H200: a few minutes
    python benchmarks/mixers_throughput.py --out DIR --smoke    # tiny CPU check of every mixer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # memlab from this checkout

from memlab import mixers  # noqa: E402
from memlab.bench.measure import call_times, environment  # noqa: E402

D_MODEL, HEADS = 512, 8
# Options per mixer at d_model 512 (head dim 64). A mixer not listed here (a new one) runs with
# its defaults plus n_heads=8 when it has heads, so it is timed without editing this file.
OPTIONS: dict[str, dict[str, Any]] = {
    "attention": {"n_heads": HEADS},
    "sliding_window": {"n_heads": HEADS, "window": 256},
    "linear_attention": {"n_heads": HEADS, "feature_dim": 16},
    "based": {"n_heads": HEADS, "feature_dim": 16, "window": 64},
    "mamba": {"d_state": 16, "expand": 2},
    "hopfield": {"n_heads": HEADS},
    "gam": {},
    "titans_mac": {"n_heads": HEADS, "chunk_size": 64},
    "titans_mag": {"n_heads": HEADS, "chunk_size": 64, "window": 256},
    "titans_mal": {"n_heads": HEADS, "chunk_size": 64, "window": 256},
    "moneta": {"n_heads": HEADS, "chunk_size": 64},
    "yaad": {"n_heads": HEADS, "chunk_size": 64},
    "memora": {"n_heads": HEADS, "chunk_size": 64},
    # one Mamba layer with its note pool; the two-layer stack (cross-layer attention) is a row below
    "memmamba": {"n_layers": 1},
    "landmark": {"n_heads": HEADS, "block_size": 64, "top_k": 4},
    "routing": {"n_heads": HEADS},
    "combiner": {"n_heads": HEADS, "span": 64},
    "rcmha": {"n_heads": HEADS},
}
# Extra rows: (label, mixer, options over the mixer's row) timed beside the one-row-per-mixer list.
EXTRA_ROWS = [
    ("memmamba x2 layers", "memmamba", {"n_layers": 2}),
    # Based's Taylor branch as PyTorch chunked matmuls instead of memlab's fused Triton kernel
    ("based chunked", "based", {"fused": False}),
] + [
    # the memory's per-chunk read and update through torch.compile (``mem_compile``)
    (f"{name} compiled", name, {"mem_compile": True})
    for name in ("titans_mac", "titans_mag", "moneta")
]


def rows(smoke: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, mixer, options) for every registered mixer, attention first (the anchor)."""
    names = mixers.names()
    ordered = (["attention"] if "attention" in names else []) + [n for n in names if n != "attention"]
    out = []
    for name in ordered:
        cls = mixers.MIXERS.get(name)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        if smoke:
            opts = dict(cls.test_config)
        elif name in OPTIONS:
            opts = dict(OPTIONS[name])
        else:
            opts = {"n_heads": HEADS} if "n_heads" in fields else {}
        out.append((name, name, {k: v for k, v in opts.items() if k in fields}))
    for label, name, opts in EXTRA_ROWS:
        if name in names:
            base = dict(mixers.MIXERS.get(name).test_config) if smoke else dict(OPTIONS.get(name, {}))
            out.append((label, name, {**base, **opts}))
    return out


def time_step(
    mixer: torch.nn.Module,
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    budget_s: float,
) -> tuple[list[float], int]:
    """Seconds of forward + backward steps (after ``warmup`` untimed ones) and the peak memory.

    The number of timed steps is ``repeats``, cut so that they fit in about ``budget_s`` given the
    last warm-up step's time (at least 3 on a GPU so the median means something).
    """
    cuda = device.type == "cuda"

    def step() -> None:
        for p in mixer.parameters():
            p.grad = None
        x.grad = None
        y, _ = mixer(x)
        y.backward(grad)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(warmup, 1)):
        # the last warm-up step sizes the timed run: the first ones include compilation
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        last = time.perf_counter() - t0
    n = max(min(repeats, int(budget_s / max(last, 1e-6))), 3 if cuda else 1)
    times = call_times(step, device=device, repeats=n)
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else 0
    return times, peak


def measure(
    label: str,
    name: str,
    options: dict[str, Any],
    *,
    seq_len: int,
    batch: int,
    d_model: int,
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    repeats: int,
    budget_s: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": label,
        "mixer": name,
        "options": options,
        "seq_len": seq_len,
        "batch": batch,
        "d_model": d_model,
        "dtype": str(dtype).removeprefix("torch."),
    }
    mixer = x = grad = None
    try:
        torch.manual_seed(0)
        mixer = mixers.build(name, d_model=d_model, **options).to(device=device, dtype=dtype).train()
        row["params"] = sum(p.numel() for p in mixer.parameters())
        x = torch.randn(batch, seq_len, d_model, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, seq_len, d_model, device=device, dtype=dtype)
        times, peak = time_step(
            mixer, x, grad, device=device, warmup=warmup, repeats=repeats, budget_s=budget_s
        )
        med = statistics.median(times)
        row.update(
            {
                "ms_per_step": med * 1e3,
                "ms_per_step_min": min(times) * 1e3,
                "timed_steps": len(times),
                "tokens_per_s": batch * seq_len / med,
                "peak_memory_bytes": peak,
            }
        )
    except Exception as exc:  # every failure is a result: recorded, never dropped
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    finally:
        del mixer, x, grad
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def write_results(
    args: argparse.Namespace,
    argv: list[str] | None,
    device: torch.device,
    results: list[dict[str, Any]],
    setup: dict[str, Any],
    t_start: float,
) -> dict[str, Any]:
    """Ratios against attention at the same length (same process), then the JSON; returns it."""
    anchor = {r["seq_len"]: r.get("tokens_per_s") for r in results if r["label"] == "attention"}
    for r in results:
        a = anchor.get(r["seq_len"])
        r["vs_attention"] = r["tokens_per_s"] / a if a and r.get("tokens_per_s") else None
    payload = {
        "benchmark": "mixers_throughput",
        "command": shlex.join(["python", "benchmarks/mixers_throughput.py", *(argv or sys.argv[1:])]),
        "smoke": args.smoke,
        "environment": environment(device),
        "setup": setup,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mixers_throughput.json").write_text(json.dumps(payload, indent=2))
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for mixers_throughput.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks every code path")
    ap.add_argument("--device", default=None, help="default: cuda when present (cpu with --smoke)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--time-budget", type=float, default=360.0, help="seconds for the whole sweep")
    ap.add_argument("--d-model", type=int, default=None, help="default 512 (32 with --smoke)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 2048 8192")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per batch, default 16384")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="time only these rows (labels as printed; attention, the anchor, always runs)",
    )
    args = ap.parse_args(argv)
    for name in ("d_model", "batch_tokens"):
        val = getattr(args, name)
        if val is not None and val < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {val}")
    if args.seq_lens and min(args.seq_lens) < 1:
        ap.error(f"--seq-lens must all be >= 1, got {args.seq_lens}")

    if args.smoke:
        device = torch.device(args.device or "cpu")
        d_model, seq_lens, batch_tokens, warmup, repeats, per_row = 32, (32, 64), 128, 1, 2, 2.0
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        d_model, seq_lens, batch_tokens, warmup, repeats, per_row = D_MODEL, (2048, 8192), 16384, 2, 10, 4.0
    # a smaller scale (the CPU); the mixers keep their options (8 heads: d_model a multiple of 8)
    d_model = args.d_model or d_model
    seq_lens = tuple(args.seq_lens or seq_lens)
    batch_tokens = args.batch_tokens or batch_tokens
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    setup = {
        "d_model": d_model,
        "seq_lens": list(seq_lens),
        "tokens_per_batch": batch_tokens,
        "dtype": args.dtype,
        "step": "forward + backward of one mixer layer, random output gradient",
        "timing": "CUDA events, median" if device.type == "cuda" else "perf_counter, median",
    }
    plan = rows(args.smoke)
    if args.only:
        known = {label for label, _, _ in plan}
        unknown = sorted(set(args.only) - known)
        if unknown:
            ap.error(f"--only: unknown rows {unknown}; known: {sorted(known)}")
        plan = [r for r in plan if r[0] in args.only or r[0] == "attention"]
    for seq_len in seq_lens:
        batch = max(1, batch_tokens // seq_len)
        for label, name, options in plan:
            if time.perf_counter() - t_start > args.time_budget:
                results.append(
                    {
                        "label": label,
                        "mixer": name,
                        "options": options,
                        "seq_len": seq_len,
                        "batch": batch,
                        "d_model": d_model,
                        "skipped": f"time budget of {args.time_budget:g} s spent",
                    }
                )
                continue
            row = measure(
                label,
                name,
                options,
                seq_len=seq_len,
                batch=batch,
                d_model=d_model,
                dtype=dtype,
                device=device,
                warmup=warmup,
                repeats=repeats,
                budget_s=per_row,
            )
            results.append(row)
            shown = f"{row['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in row else row["error"]
            print(f"T={seq_len:>5} B={batch:>2} {label:<22} {shown}", flush=True)
            # written after every row, so that a timeout or Ctrl-C keeps what was measured
            write_results(args, argv, device, results, setup, t_start)
    payload = write_results(args, argv, device, results, setup, t_start)
    path = Path(args.out) / "mixers_throughput.json"
    print(f"\n{'mixer':<22} " + " ".join(f"{'T=' + str(n):>22}" for n in seq_lens))
    for label, _, _ in plan:
        cells = []
        for n in seq_lens:
            r = next(r for r in results if r["label"] == label and r["seq_len"] == n)
            if "tokens_per_s" in r:
                ratio = "-" if r["vs_attention"] is None else f"{r['vs_attention']:.2f}x"
                cells.append(f"{r['tokens_per_s']:>12,.0f} ({ratio})")
            else:
                cells.append(f"{('failed' if 'error' in r else 'skipped'):>22}")
        print(f"{label:<22} " + " ".join(f"{c:>22}" for c in cells))
    print(f"wrote {path} in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
