"""KV-cache policies on SmolLM2-135M-Instruct: accuracy vs budget, memory, prefill and decode speed.

    python benchmarks/kv.py --out DIR            # one H200, < 8 minutes
    python benchmarks/kv.py --out DIR --smoke    # CPU, tiny sizes (tests the script)

Sections, in order (each writes into DIR/kv.json as it finishes):
1. correctness: the ``full`` policy reproduces transformers' own cache (greedy tokens, fp32), and
   the flash2 decode kernel agrees with its reference on compressed caches (bf16 on GPU);
2. DuoAttention gates, learned here (memlab's own optimisation) unless ``--duo-gates`` is given;
3. accuracy: every policy x ratio on the niah ``single`` task (vault code in synthetic filler,
   where the full model succeeds) at each ``--lengths``, ``--samples`` prompts per point, both
   modes (query-agnostic: context compressed before the question; query-aware); plus the full
   model's own limits (pass-key needle, real-text haystack);
4. speed and memory at ``--speed-lengths`` (8k-64k, the same architecture with a longer RoPE
   range): prefill time, per-token decode latency (CUDA events, median), peak memory, KV bytes,
   rows read per decoding step; every policy at ratio 0.1 (DuoAttention: retrieval-head ratio
   0.25) against the full cache, and SnapKV with chunked prefill.
Then DIR/kv.md (tables, each paper's claim beside ours) and DIR/kv_accuracy.png, DIR/kv_speed.png.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memlab.bench.jobs.kv_niah import aggregate, evaluate, policy_specs
from memlab.bench.measure import device_name, live_at_peak
from memlab.kvcache import KVCache, generate, policies, run_prompt
from memlab.kvcache.attention import active_layers
from memlab.kvcache.calibrate import calibrate_duo
from memlab.kvcache.policies.duo import load_gates, save_gates
from memlab.models.pretrained import load
from memlab.tasks.niah import Niah, NiahConfig

POLICIES = ["full", "streaming", "h2o", "snapkv", "pyramidkv", "alisa", "cake", "duo", "delta", "gemfilter"]
CLAIMS = {
    "duo": "DuoAttention: up to 2.55x (MHA) / 1.67x (GQA) less memory, decode up to 2.18x / 1.50x faster",
    "cake": "CAKE: quality kept with 3.2% of the cache; > 10x faster decoding than full at 128k",
    "gemfilter": "GemFilter: 2.4x faster and 30% less GPU memory than SnapKV/H2O",
    "delta": "DELTA: up to 5x fewer attended tokens, 1.5x end-to-end speedup",
    "alisa": "ALISA: throughput up to 3x FlexGen / 1.9x vLLM (offloading systems; not comparable here)",
}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "triton", "transformers", "memlab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


class Clock:
    """Wall time of a region: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            torch.cuda.synchronize()
            return out, start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        return out, time.perf_counter() - t0


def specs_for(ratios: list[float], smoke: bool) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [{"name": "full"}]
    for name in POLICIES[1:]:
        entry: dict[str, Any] = {"name": name, "ratio": list(ratios)}
        if name == "duo":
            entry["options"] = {"gates": "auto"}
        if name == "cake":
            entry["ratio"] = sorted(set(ratios) | {0.032}, reverse=True)
        if smoke and name in ("snapkv", "cake"):
            entry["options"] = {"window": 8}
        if smoke and name == "pyramidkv":
            entry["options"] = {"window": 4}
        entries.append(entry)
    return policy_specs(entries, "benchmarks/kv.py")


def with_gates(specs: list[dict[str, Any]], gates_file: Path) -> list[dict[str, Any]]:
    out = []
    for s in specs:
        if s["name"] == "duo":
            s = {**s, "options": {**s["options"], "gates": str(gates_file)}}
        out.append(s)
    return out


def correctness(model_id: str, device: torch.device, dtype: torch.dtype, length: int) -> dict[str, Any]:
    """fp32: full policy == transformers' DynamicCache; low precision: kernel vs reference decode."""
    import memlab.kvcache.cache as cache_mod

    out: dict[str, Any] = {}
    model, tok = load(model_id, dtype=torch.float32, device=device)
    task = Niah(NiahConfig(variant="single", length=length, tokenizer=model_id))
    samples = task.samples(tok, 2, seed=123)
    match = []
    for s in samples:
        ids = s.prompt_ids[None].to(device)
        model.config._attn_implementation = "sdpa"
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id)[:, ids.shape[1] :]
        got = generate(model, ids, KVCache(model.config), max_new_tokens=16)
        # transformers stops at the end-of-turn token; compare the tokens it produced.
        match.append(bool(torch.equal(ref, got[:, : ref.shape[1]])))
    out["full_equals_transformers_fp32"] = match
    del model
    if dtype != torch.float32:
        model, tok = load(model_id, dtype=dtype, device=device)
        real = cache_mod.ragged_decode
        diffs, agree = [], []
        for s in samples:
            ids = s.prompt_ids[None].to(device)
            runs = []
            for use_reference in (False, True):
                if use_reference:
                    from memlab.ops.attention import decode_reference

                    def ref_decode(q, k, v, lengths, scale, window=None, sinks=0):
                        return decode_reference(q, k, v, lengths, scale=scale, window=window, sinks=sinks)

                    cache_mod.ragged_decode = ref_decode
                try:
                    policy = policies.build("snapkv", ratio=0.25, query_aware=True)
                    cache = KVCache(model.config, policy=policy)
                    logits = run_prompt(model, ids[:, :-8], cache, question_ids=ids[:, -8:])
                    steps = [logits.float()]
                    nxt = logits.argmax(-1)
                    for _ in range(8):
                        from memlab.kvcache.generate import decode_step

                        logits = decode_step(model, cache, nxt)
                        steps.append(logits.float())
                        nxt = logits.argmax(-1)
                    runs.append(torch.stack(steps))
                finally:
                    cache_mod.ragged_decode = real
            diffs.append(float((runs[0] - runs[1]).abs().max()))
            agree.append(float((runs[0].argmax(-1) == runs[1].argmax(-1)).float().mean()))
        out["kernel_vs_reference_max_logit_diff"] = diffs
        out["kernel_vs_reference_token_agreement"] = agree
        del model
    return out


def duo_gates(
    model_id: str, device: torch.device, out_dir: Path, smoke: bool, given: str | None
) -> tuple[Path, dict]:
    if given:
        gates, meta = load_gates(given)
        return Path(given), {"source": given, **meta}
    model, tok = load(model_id, dtype=torch.float32, device=device)
    steps, prompts, length = (3, 2, 256) if smoke else (100, 16, 1024)
    res = calibrate_duo(model, tok, steps=steps, num_prompts=prompts, length=length, sinks=16, window=64)
    path = save_gates(out_dir / "duo_gates_smollm2-135m.safetensors", res.gates, res.meta)
    del model
    return path, {**res.meta, "loss_first": res.losses[0], "loss_last": res.losses[-1],
                  "gates_mean": float(res.gates.mean())}


def accuracy(model_id: str, device: torch.device, dtype: torch.dtype, specs, lengths, samples: int,
             modes: list[str], batch: int, deadline: float, log, max_new_tokens: int = 24,
             save: Any = None) -> dict[str, Any]:
    """``save(out)`` is called after every policy, so a run killed midway keeps what it measured."""
    model, tok = load(model_id, dtype=dtype, device=device)
    out: dict[str, Any] = {"points": {}, "limits": {}}
    for length in lengths:
        task = Niah(NiahConfig(variant="single", length=length, tokenizer=model_id))
        ss = task.samples(tok, samples, seed=0)
        for mode in modes:
            if time.time() > deadline:
                out["points"][f"{length}/{mode}"] = {"skipped": "time budget"}
                continue
            t0 = time.time()
            point = f"{length}/{mode}"

            def progress(rows, point=point, t0=t0) -> None:
                out["points"][point] = {"seconds": round(time.time() - t0, 1), "partial": True,
                                        "policies": aggregate(rows)}
                if save is not None:
                    save(out)

            rows = evaluate(model, tok, ss, specs, model_name=model_id, mode=mode,
                            max_new_tokens=max_new_tokens, batch_size=batch, on_progress=progress)
            seconds = round(time.time() - t0, 1)
            out["points"][f"{length}/{mode}"] = {"seconds": seconds, "policies": aggregate(rows)}
            log(f"accuracy L={length} {mode}: {time.time() - t0:.0f}s")
    full_only = [s for s in specs if s["name"] == "full"]
    for variant, haystack in (("passkey", "synthetic"), ("single", "real")):
        if time.time() > deadline:
            break
        task = Niah(NiahConfig(variant=variant, haystack=haystack, length=lengths[0], tokenizer=model_id))
        ss = task.samples(tok, samples, seed=0)
        rows = evaluate(model, tok, ss, full_only, model_name=model_id, mode="agnostic", batch_size=batch,
                        max_new_tokens=max_new_tokens)
        out["limits"][f"{variant}/{haystack}/{lengths[0]}"] = {
            **aggregate(rows)["full"], "haystack_source": ss[0].meta["haystack_source"]}
    del model
    return out


def speed(model_id: str, device: torch.device, dtype: torch.dtype, lengths: list[int], gates_file: Path,
          smoke: bool, deadline: float, log, save: Any = None, history: bool = False) -> dict[str, Any]:
    """``save(results)`` is called after every configuration timed. ``history``: record the CUDA
    allocator's history over each configuration's decoding steps and keep the blocks live at their
    peak (a diagnosis of decoding memory; it slows the steps, so their timings are not comparable)."""
    from transformers import AutoModelForCausalLM

    from memlab.models.pretrained import checkpoint_dir

    path = checkpoint_dir(model_id)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                 max_position_embeddings=max(lengths) + 256).to(device).eval()
    clock = Clock(device)
    window = 8 if smoke else 32
    configs = [
        ("full", {}, None),
        ("streaming", {"ratio": 0.1}, None),
        ("h2o", {"ratio": 0.1}, None),
        ("snapkv", {"ratio": 0.1, "window": window}, None),
        ("snapkv", {"ratio": 0.1, "window": window}, 4096 if not smoke else 64),
        ("pyramidkv", {"ratio": 0.1}, None),
        ("alisa", {"ratio": 0.1}, None),
        ("cake", {"ratio": 0.1, "window": window}, None),
        ("duo", {"ratio": 0.25, "gates": str(gates_file)}, None),
        ("duo", {"ratio": 0.5, "gates": str(gates_file)}, None),
        ("gemfilter", {"ratio": 0.1}, None),
        ("delta", {"ratio": 0.1}, None),
    ]
    g = torch.Generator().manual_seed(0)
    steps = 8 if smoke else 32
    results: dict[str, Any] = {}
    # A first pass at a short length, thrown away, compiles the Triton kernels and warms the
    # allocator for every configuration: otherwise the first configuration timed pays for them.
    warm = 256 if smoke else 1024
    for i, length in enumerate([warm, *lengths]):
        warming = i == 0
        # the warm-up pass writes into a dict that is thrown away
        out = {} if warming else results
        ctx = torch.randint(100, 40000, (1, length), generator=g).to(device)
        question = torch.randint(100, 40000, (1, 16), generator=g).to(device)
        if time.time() < deadline:
            base = transformers_baseline(model, ctx, question, steps, clock)
            out[f"transformers-dynamic/L={length}"] = base
            model.config._attn_implementation = "sdpa"
        if not warming and time.time() < deadline:
            # The decode kernel's reduction is specialised on the number of KV splits, which
            # depends on the cache length: one untimed prompt per length compiles it, so the
            # first configuration timed at that length does not pay for the compilation.
            warm_cache = KVCache(model.config, policy=policies.build("full"))
            run_prompt(model, ctx, warm_cache, question_ids=question)
            del warm_cache
        for name, cfg, chunk in configs:
            key = f"{name}@{cfg.get('ratio', 1)}" + (f"/chunk{chunk}" if chunk else "") + f"/L={length}"
            if time.time() > deadline:
                out[key] = {"skipped": "time budget"}
                continue
            try:
                # Nothing of the previous configuration may stay alive into this one's peak: the
                # attention hook keeps the last cache's layers, and caches hold reference cycles.
                active_layers().clear()
                gc.collect()
                policy = policies.build(name, **{k: v for k, v in cfg.items()})
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    base_mem = torch.cuda.memory_allocated(device)
                cache = KVCache(model.config, policy=policy, prefill_chunk=chunk)
                logits, t_prefill = clock(run_prompt, model, ctx, cache, question_ids=question, chunk=chunk)
                cuda = device.type == "cuda"
                prefill_top = torch.cuda.max_memory_allocated(device) if cuda else None
                kv_bytes, full_bytes = cache.nbytes(), cache.full_nbytes()
                lat = []
                nxt = logits.argmax(-1)
                from memlab.kvcache.generate import decode_step

                record = cuda and history and not warming  # not the thrown-away warm-up pass
                if cuda:
                    # The decoding steps' own peak, above what the cache holds when they start.
                    torch.cuda.synchronize()
                    decode_start = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    if record:
                        torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
                for i in range(steps + 4):
                    logits, dt = clock(decode_step, model, cache, nxt)
                    nxt = logits.argmax(-1)
                    if i >= 4:
                        lat.append(dt)
                decode_info: dict[str, Any] = {}
                if cuda:
                    decode_peak = torch.cuda.max_memory_allocated(device)
                    decode_info["decode_peak_over_start_bytes"] = decode_peak - decode_start
                    decode_info["decode_growth_bytes"] = torch.cuda.memory_allocated(device) - decode_start
                    if record:
                        snap = torch.cuda.memory._snapshot()
                        torch.cuda.memory._record_memory_history(enabled=None)
                        decode_info["decode_peak_blocks"] = live_at_peak(snap)
                        decode_info["timed_with_history"] = True  # stack capture slows the steps
                peak_prefill = prefill_top - base_mem if cuda else None
                peak = max(prefill_top, decode_peak) - base_mem if cuda else None
                options = {k: v for k, v in cfg.items() if k != "gates"}
                out[key] = {
                    "policy": name, "length": length, "chunk": chunk, **options,
                    "prefill_s": t_prefill, "decode_ms": 1e3 * statistics.median(lat),
                    "kv_bytes": kv_bytes, "full_kv_bytes": full_bytes, "kv_fraction": kv_bytes / full_bytes,
                    "peak_prefill_bytes": peak_prefill, "peak_bytes": peak,
                    "attended_ratio": cache.attended_ratio(), **decode_info,
                }
                log(f"speed {key}: prefill {t_prefill:.3f}s decode {out[key]['decode_ms']:.2f}ms "
                    f"kv {kv_bytes / full_bytes:.3f}")
                del cache
            except torch.OutOfMemoryError as exc:
                out[key] = {"error": f"OOM: {exc}"[:200]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if save is not None and not warming:
                save(results)
        if warming:
            log(f"speed warm-up at L={warm} done (not reported)")
    return results


def transformers_baseline(model: Any, ctx: torch.Tensor, question: torch.Tensor, steps: int,
                          clock: Clock) -> dict[str, Any]:
    """transformers' own DynamicCache with SDPA: the cache every policy is compared against."""
    from transformers import DynamicCache

    device = ctx.device
    previous = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
        cache = DynamicCache()
        ids = torch.cat([ctx, question], dim=1)

        def run() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]

        logits, t_prefill = clock(run)
        kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        lat = []
        nxt = logits.argmax(-1)
        for i in range(steps + 4):
            def step(nxt: torch.Tensor = nxt) -> torch.Tensor:
                with torch.no_grad():
                    return model(input_ids=nxt[:, None], past_key_values=cache).logits[:, -1]

            logits, dt = clock(step)
            nxt = logits.argmax(-1)
            if i >= 4:
                lat.append(dt)
        peak = torch.cuda.max_memory_allocated(device) - base_mem if cuda else None
        return {"policy": "transformers-dynamic", "length": ctx.shape[1], "prefill_s": t_prefill,
                "decode_ms": 1e3 * statistics.median(lat), "kv_bytes": kv, "full_kv_bytes": kv,
                "kv_fraction": 1.0,
                "peak_bytes": peak, "attended_ratio": 1.0}
    finally:
        model.config._attn_implementation = previous


def write_markdown(report: dict[str, Any], out: Path) -> None:
    lines = [f"# KV-cache policies on SmolLM2-135M-Instruct ({report['device']})", "",
             f"Command: `{report['command']}`; date {report['date']}; versions {report['versions']}.", ""]
    lines += ["## Correctness", "", "```", json.dumps(report.get("correctness", {}), indent=1), "```", ""]
    acc = report.get("accuracy", {})
    for point, entry in acc.get("points", {}).items():
        if "policies" not in entry:
            continue
        state = ", killed midway: the policies measured so far" if entry.get("partial") else ""
        lines += [f"## Accuracy, niah single (synthetic), {point} ({entry['seconds']} s{state})", "",
                  "| policy@ratio | n | exact match | log-lik | KV held / full | rows read / held |",
                  "|---|---|---|---|---|---|"]
        for key, m in entry["policies"].items():
            if "error" in m:
                lines.append(f"| {key} | 0 | error: {m['error'][:60]} | | | |")
                continue
            ll = m.get("loglik", float("nan"))
            lines.append(f"| {key} | {m['n']} | {m['em']:.2f} ± {m.get('em_se', 0):.2f} | {ll:.2f} | "
                         f"{m['kv_fraction']:.3f} | {m['attended_ratio']:.3f} |")
        lines.append("")
    if acc.get("limits"):
        lines += ["## The full model's own limits", "", "| task | exact match | log-lik |", "|---|---|---|"]
        for k, m in acc["limits"].items():
            lines.append(f"| {k} | {m.get('em', float('nan')):.2f} | {m.get('loglik', float('nan')):.2f} |")
        lines.append("")
    sp = report.get("speed", {})
    if sp:
        lines += ["## Speed and memory (batch 1)", "",
                  "| config | prefill s | decode ms/token | KV held / full | peak MiB | prefill peak MiB | "
                  "decoding peak above its start MiB | rows read / held |",
                  "|---|---|---|---|---|---|---|---|"]

        def mib(m: dict[str, Any], key: str) -> str:
            return f"{m[key] / 2**20:.0f}" if m.get(key) is not None else "-"

        for k, m in sp.items():
            if "prefill_s" not in m:
                lines.append(f"| {k} | {m} | | | | | | |")
                continue
            lines.append(f"| {k} | {m['prefill_s']:.3f} | {m['decode_ms']:.2f} | {m['kv_fraction']:.3f} | "
                         f"{mib(m, 'peak_bytes')} | {mib(m, 'peak_prefill_bytes')} | "
                         f"{mib(m, 'decode_peak_over_start_bytes')} | {m['attended_ratio']:.3f} |")
        lines.append("")
    lines += ["## Paper claims beside ours", ""] + [f"- {v}" for v in CLAIMS.values()] + [""]
    lines += ["Ours: see `claims` in kv.json."]
    out.write_text("\n".join(lines) + "\n")


def claims(report: dict[str, Any]) -> dict[str, Any]:
    """Our numbers for each paper's headline claim, from the speed and accuracy sections."""
    sp = {k: v for k, v in report.get("speed", {}).items() if "prefill_s" in v}
    out: dict[str, Any] = {}
    if not sp:
        return out
    longest = max(v["length"] for v in sp.values())

    def get(prefix: str) -> dict[str, Any] | None:
        return sp.get(f"{prefix}/L={longest}")

    full = get("full@1")
    hf = sp.get(f"transformers-dynamic/L={longest}")
    if full and hf:
        out["memlab_full_vs_transformers"] = {
            "length": longest, "decode_ms": [full["decode_ms"], hf["decode_ms"]],
            "prefill_s": [full["prefill_s"], hf["prefill_s"]],
        }
    for key, label in (("duo@0.25", "duo"), ("delta@0.1", "delta"), ("cake@0.1", "cake")):
        m = get(key)
        if m and full:
            out[label] = {"length": longest, "kv_memory_x": full["kv_bytes"] / m["kv_bytes"],
                          "decode_speedup_x": full["decode_ms"] / m["decode_ms"],
                          "prefill_speedup_x": full["prefill_s"] / m["prefill_s"],
                          "rows_read_fraction": m["attended_ratio"]}
            if m.get("peak_bytes") and full.get("peak_bytes"):
                out[label]["peak_memory_x"] = full["peak_bytes"] / m["peak_bytes"]
    gem, snap = get("gemfilter@0.1"), get("snapkv@0.1")
    if gem and snap:
        out["gemfilter_vs_snapkv"] = {
            "length": longest, "prefill_speedup_x": snap["prefill_s"] / gem["prefill_s"],
            "decode_speedup_x": snap["decode_ms"] / gem["decode_ms"],
        }
        if gem.get("peak_bytes") and snap.get("peak_bytes"):
            out["gemfilter_vs_snapkv"]["peak_memory_saving"] = 1 - gem["peak_bytes"] / snap["peak_bytes"]
    acc = report.get("accuracy", {}).get("points", {})
    for point, entry in acc.items():
        pol = entry.get("policies", {})
        if "cake@0.032" in pol and "full" in pol and "em" in pol["full"]:
            out.setdefault("cake_3.2pct", {})[point] = {"cake_em": pol["cake@0.032"].get("em"),
                                                         "full_em": pol["full"]["em"]}
    return out


def plots(report: dict[str, Any], out_dir: Path) -> None:
    from memlab.bench.report import Panel, Series, save_panels

    panels = []
    for point, entry in report.get("accuracy", {}).get("points", {}).items():
        pol = entry.get("policies", {})
        by: dict[str, list[tuple[float, float]]] = {}
        for m in pol.values():
            if "em" in m and m["policy"] != "full":
                by.setdefault(m["label"], []).append((m["kv_fraction"], m["em"]))
        series = [Series(key=k, x=[x for x, _ in sorted(v)], y=[y for _, y in sorted(v)], label=k)
                  for k, v in sorted(by.items())]
        full = pol.get("full", {})
        if "em" in full:
            series.append(Series(key="full", x=[1.0], y=[full["em"]], label="full", line=False))
        if series:
            panels.append(Panel(title=point, xlabel="KV held / full", ylabel="exact match", series=series,
                                xlog=True, ylim=(-0.05, 1.05)))
    if panels:
        save_panels(out_dir / "kv_accuracy.png", panels, suptitle="niah single: accuracy vs KV budget")
    sp = {k: v for k, v in report.get("speed", {}).items() if "decode_ms" in v}
    if sp:
        by_pol: dict[str, list[tuple[int, float, float]]] = {}
        for k, v in sp.items():
            by_pol.setdefault(k.rsplit("/L=", 1)[0], []).append((v["length"], v["decode_ms"], v["prefill_s"]))
        dec = [Series(key=k, x=[a for a, _, _ in sorted(v)], y=[b for _, b, _ in sorted(v)], label=k)
               for k, v in sorted(by_pol.items())]
        pre = [Series(key=k, x=[a for a, _, _ in sorted(v)], y=[c for _, _, c in sorted(v)], label=k)
               for k, v in sorted(by_pol.items())]
        save_panels(out_dir / "kv_speed.png",
                    [Panel("decode latency", "prompt tokens", "ms / token", dec, xlog=True, xbase=2),
                     Panel("prefill time", "prompt tokens", "s", pre, xlog=True, xbase=2, ylog=True)],
                    suptitle="KV policies: speed vs length (batch 1)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--modes", nargs="+", default=["agnostic", "aware"])
    p.add_argument("--speed-lengths", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--duo-gates", default=None, help="use these gates instead of calibrating")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this")
    p.add_argument("--policies", nargs="+", default=None,
                   help="measure only these policies' accuracy (full is always measured: the reference)")
    p.add_argument("--memory-history", action="store_true",
                   help="speed: record where the decoding steps' peak memory was allocated (slows them)")
    p.add_argument("--skip", nargs="*", default=[], choices=["correctness", "accuracy", "speed"])
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    smoke = args.smoke
    samples = args.samples or (2 if smoke else 50)
    lengths = args.lengths or ([256] if smoke else [1024, 2048, 4096])
    speed_lengths = args.speed_lengths or ([512, 1024] if smoke else [8192, 16384, 32768, 65536])
    batch = args.batch or samples
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    report: dict[str, Any] = {
        "command": "python benchmarks/kv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_name(device), "dtype": str(dtype), "versions": versions(),
        "samples_per_point": samples, "lengths": lengths, "ratios": args.ratios, "modes": args.modes,
        "ratio_meaning": "fraction of KV kept (kvpress compression_ratio = 1 - ratio); duo: retrieval heads",
    }
    json_path = args.out / "kv.json"

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=1, default=str))

    if "correctness" not in args.skip:
        report["correctness"] = correctness(args.model, device, dtype, lengths[0])
        log(f"correctness: {report['correctness']}")
        save()
    gates_file, report["duo_gates"] = duo_gates(args.model, device, args.out, smoke, args.duo_gates)
    log(f"duo gates: {report['duo_gates']}")
    save()
    specs = with_gates(specs_for(args.ratios, smoke), gates_file)
    if args.policies:
        unknown = sorted(set(args.policies) - {s["name"] for s in specs})
        if unknown:
            raise SystemExit(f"--policies: unknown {unknown}; expected names from {POLICIES}")
        specs = [s for s in specs if s["name"] == "full" or s["name"] in args.policies]
    if "accuracy" not in args.skip:
        def save_accuracy(out: dict[str, Any]) -> None:
            report["accuracy"] = out
            save()

        report["accuracy"] = accuracy(args.model, device, dtype, specs, lengths, samples, args.modes, batch,
                                      start + 0.6 * args.budget_s, log, max_new_tokens=6 if smoke else 24,
                                      save=save_accuracy)
        save()
    if "speed" not in args.skip:
        def save_speed(results: dict[str, Any]) -> None:
            report["speed"] = results
            save()

        report["speed"] = speed(args.model, device, dtype, speed_lengths, gates_file, smoke, deadline, log,
                                save=save_speed, history=args.memory_history)
        save()
    report["claims"] = claims(report)
    report["seconds"] = round(time.time() - start, 1)
    save()
    write_markdown(report, args.out / "kv.md")
    plots(report, args.out)
    log(f"done: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
