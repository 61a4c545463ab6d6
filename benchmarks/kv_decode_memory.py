"""Memory of each KV policy's decoding steps, per step: what a decoding step allocates beyond the cache.

    python benchmarks/kv_decode_memory.py --out DIR [--length 8192] [--policies streaming,delta]

A randomly initialised model of SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads, head dim
64, bf16 on GPU) is enough: the cache's memory does not depend on the weights, and no asset has
to be staged. For each policy: prefill ``--length`` tokens (plus a 16-token question, the cache
frozen in between as in kv.py's query-agnostic mode), then ``--steps`` decoding steps. Per step:
bytes live before and after (growth = something kept), and the step's peak above its start
(transient). On CUDA the allocator's history of one step gives the allocations live at its peak,
with the Python frames that made them. On the CPU the tensors made during the steps are tracked at
the dispatcher (``LiveBytes``): what is still alive after the last step beyond the cache's own
buffers is kept by something else. ``--autograd`` decodes with autograd recording, as kv.py's
speed loop did before 2026-12-05 (``decode_step`` now never records): the comparison shows what
that cost in memory and time. Writes DIR/kv_decode_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memlab.bench.live_bytes import LiveBytes
from memlab.bench.measure import live_at_peak
from memlab.kvcache import KVCache, policies, run_prompt
from memlab.kvcache.attention import active_layers
from memlab.kvcache.generate import decode_step

DEFAULT = ["full", "streaming", "h2o", "alisa", "cake", "delta", "snapkv"]


def smollm2_shaped(device: torch.device, dtype: torch.dtype, max_len: int, layers: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max_len,
        rope_theta=100000.0, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def measure(model: Any, name: str, cfg: dict[str, Any], length: int, steps: int, device: torch.device,
            history: bool, autograd: bool = False) -> dict[str, Any]:
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, 40000, (1, length), generator=g).to(device)
    question = torch.randint(100, 40000, (1, 16), generator=g).to(device)
    active_layers().clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    cache = KVCache(model.config, policy=policies.build(name, **cfg))
    with torch.no_grad():
        logits = run_prompt(model, ctx, cache, question_ids=question)
    row: dict[str, Any] = {"policy": name, **cfg, "length": length, "kv_bytes": cache.nbytes(),
                           "full_kv_bytes": cache.full_nbytes()}
    if cuda:
        torch.cuda.synchronize()
        row["prefill_peak"] = torch.cuda.max_memory_allocated(device) - base
        row["after_prefill"] = torch.cuda.memory_allocated(device) - base
    per_step = []
    nxt = logits.argmax(-1)
    # decode_step never records autograd; its undecorated body does, as the old speed loop did.
    step_fn = decode_step.__wrapped__ if autograd else decode_step
    tracker = None if cuda else LiveBytes(exclude=model.parameters())
    if tracker is not None:
        tracker.__enter__()
    try:
        for i in range(steps):
            record = history and cuda and i == steps - 1
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                if record:
                    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
            t0 = time.perf_counter()
            with torch.set_grad_enabled(autograd):
                logits = step_fn(model, cache, nxt)
            nxt = logits.argmax(-1)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if cuda:
                after = torch.cuda.memory_allocated(device)
                peak = torch.cuda.max_memory_allocated(device)
                per_step.append({"growth": after - before, "peak_over_start": peak - before, "s": seconds})
                if record:
                    snap = torch.cuda.memory._snapshot()
                    torch.cuda.memory._record_memory_history(enabled=None)
                    row["live_at_peak"] = live_at_peak(snap)
            else:
                # alive: bytes of the tensors made since the first step that are still alive
                per_step.append({"alive": tracker.current, "peak": tracker.peak, "s": seconds})
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    row["autograd"] = autograd
    row["held_bytes"] = cache.held_nbytes()
    if tracker is not None and per_step:
        # The cache's buffers are rebuilt as it grows or evicts, so they are among the tensors
        # made during the steps; anything alive beyond them is kept by something else.
        row["kept_beyond_cache"] = max(per_step[-1]["alive"] - row["held_bytes"], 0)
    row["steps"] = per_step
    row["kv_bytes_after"] = cache.nbytes()
    del cache
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--policies", default=",".join(DEFAULT))
    p.add_argument("--no-history", action="store_true")
    p.add_argument("--autograd", action="store_true", help="decode with autograd recording (the old loop)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = smollm2_shaped(device, dtype, args.length + 512, args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"device": str(device), "length": args.length, "steps": args.steps,
                           "layers": args.layers, "autograd": args.autograd, "rows": []}
    path = args.out / "kv_decode_memory.json"
    for name in args.policies.split(","):
        cfg: dict[str, Any] = {} if name == "full" else {"ratio": 0.1}
        t0 = time.time()
        try:
            row = measure(model, name, cfg, args.length, args.steps, device, not args.no_history,
                          args.autograd)
        except Exception as exc:  # recorded, and the next policy still runs
            row = {"policy": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        row["wall_s"] = time.time() - t0
        out["rows"].append(row)
        path.write_text(json.dumps(out, indent=1))
        steps = row.get("steps", [])
        ms = sorted(1e3 * s["s"] for s in steps)[len(steps) // 2] if steps else None
        if device.type == "cuda":
            per = [(s["growth"] >> 20, s["peak_over_start"] >> 20) for s in steps]
        else:
            per = [s["alive"] >> 20 for s in steps]
        print(name, {k: row.get(k) for k in ("prefill_peak", "after_prefill", "kv_bytes", "held_bytes",
                                             "kept_beyond_cache")}, "median ms/step", ms, per, flush=True)
        for blk in row.get("live_at_peak", [])[:6]:
            print(f"   {blk['bytes'] >> 20} MiB", " < ".join(blk["frames"][:4]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
