"""memlab's KV policies beside NVIDIA kvpress on the same prompts, model, budgets and modes.

    python benchmarks/kvpress_peer.py --out DIR --peer-path /tmp/kvpress_site [--smoke]

kvpress 0.5.x needs transformers < 5.3, so it runs in a separate process whose PYTHONPATH puts
``--peer-path`` (kvpress, its transformers and their pure-Python dependencies, installed with
``pip install --no-deps --target``) first; memlab's environment is never touched. The parent
process makes the niah prompts with memlab, runs memlab's ``snapkv``, ``streaming`` and
``pyramidkv`` (with kvpress's settings: window 64, average pooling over 5 tokens, votes averaged
over the query heads of a KV head, 4 sinks), writes
the prompt token ids to DIR, starts the worker (this same file with ``--worker``), and joins the
results into DIR/kvpress_peer.json and DIR/kvpress_peer.md.

Modes: ``agnostic`` (kvpress's pipeline: the context is compressed, then the question is fed
with positions that continue the context) and ``aware`` (context and question compressed
together). Budgets: memlab ``ratio`` = fraction kept = 1 - kvpress ``compression_ratio``.
The worker also runs KnormPress, ExpectedAttentionPress and TOVAPress as further anchors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

PRESSES = ["SnapKVPress", "StreamingLLMPress", "PyramidKVPress", "KnormPress", "ExpectedAttentionPress",
           "TOVAPress"]
MEMLAB_TWIN = {"snapkv": "SnapKVPress", "streaming": "StreamingLLMPress", "pyramidkv": "PyramidKVPress"}


# --- worker: runs with kvpress and its own transformers; imports nothing from memlab ----------------
def _stub_optional_imports() -> list[str]:
    """kvpress imports datasets/fire/requests for presses we do not run; stub what is missing."""
    import importlib
    import types

    stubbed = []
    for name in ("datasets", "fire", "requests", "cachetools"):
        try:
            importlib.import_module(name)
        except Exception:  # missing or broken (e.g. no pyarrow): only unused presses need them
            mod = types.ModuleType(name)
            if name == "datasets":
                mod.load_dataset = None
            if name == "cachetools":
                mod.LRUCache = dict
                mod.cached = lambda *a, **k: (lambda f: f)
            sys.modules[name] = mod
            stubbed.append(name)
    return stubbed


def worker(prompts_file: Path, out_file: Path) -> None:
    stubbed = _stub_optional_imports()
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM

    spec = json.loads(prompts_file.read_text())
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype, local_files_only=True,
                                                 attn_implementation="sdpa").to(device).eval()
    results = []
    for si, p in enumerate(spec["prompts"]):
        ctx = torch.tensor([p["context"]], device=device)
        question = torch.tensor([p["question"]], device=device)
        answer = torch.tensor([p["answer"]], device=device)
        for mode in spec["modes"]:
            jobs: list[tuple[str, float | None, Any]] = [("none", None, None)]
            for name in PRESSES:
                for ratio in spec["ratios"]:
                    kwargs: dict[str, Any] = {"compression_ratio": 1.0 - ratio}
                    if name in ("SnapKVPress", "PyramidKVPress"):
                        kwargs["window_size"] = spec["window"]
                    jobs.append((name, ratio, getattr(kvpress, name)(**kwargs)))
            for name, ratio, press in jobs:
                try:
                    with torch.no_grad():
                        r = _run_press(model, press, ctx, question, answer, mode, spec, device)
                    results.append({"sample": si, "mode": mode, "press": name, "ratio": ratio, **r})
                except Exception as exc:  # a press that fails on this model is reported, not fatal
                    results.append({"sample": si, "mode": mode, "press": name, "ratio": ratio,
                                    "error": f"{type(exc).__name__}: {exc}"[:300]})
    out_file.write_text(json.dumps({
        "kvpress": getattr(kvpress, "__version__", "0.5.x"), "transformers": transformers.__version__,
        "torch": torch.__version__, "stubbed_imports": stubbed, "results": results,
    }, indent=1))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _run_press(model: Any, press: Any, ctx: torch.Tensor, question: torch.Tensor, answer: torch.Tensor,
               mode: str, spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """kvpress's way (its pipeline): prefill under the press, then feed the question (agnostic)
    with positions continuing the context; greedy answer and teacher-forced answer likelihood."""
    from transformers import DynamicCache

    cache = DynamicCache()
    prompt = ctx if mode == "agnostic" else torch.cat([ctx, question], dim=1)
    t0 = time.perf_counter()
    with press(model) if press is not None else _null():
        hidden = model.model(input_ids=prompt, past_key_values=cache).last_hidden_state
    prompt_s = time.perf_counter() - t0
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    pos = prompt.shape[1]
    if mode == "agnostic":
        ids = torch.arange(pos, pos + question.shape[1], device=device)[None]
        out = model(input_ids=question, past_key_values=cache, logits_to_keep=1, position_ids=ids)
        first = out.logits[:, -1]
        pos += question.shape[1]
    else:
        first = model.lm_head(hidden[:, -1])
    snapshot = [(layer.keys, layer.values) for layer in cache.layers]

    def step(token: torch.Tensor, at: int) -> torch.Tensor:
        at_ids = torch.tensor([[at]], device=device)
        return model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=at_ids).logits[:, -1]

    tokens = []
    logits = first
    for i in range(spec["max_new_tokens"]):
        nxt = logits.argmax(-1)
        tokens.append(int(nxt))
        if int(nxt) == spec["eos"]:
            break
        logits = step(nxt, pos + i)
    # Teacher forcing from the same compressed prompt (the generated tokens are dropped).
    for layer, (k, v) in zip(cache.layers, snapshot, strict=True):
        layer.keys, layer.values = k, v
    ll, logits = 0.0, first
    for i in range(answer.shape[1]):
        ll += float(torch.log_softmax(logits.double(), -1)[0, answer[0, i]])
        if i + 1 < answer.shape[1]:
            logits = step(answer[0, i], pos + i)
    return {"tokens": tokens, "loglik": ll, "kv_bytes": kv_bytes, "prompt_s": prompt_s}


# --- parent: memlab side, prompts, and the join ---------------------------------------------------
def parent(args: argparse.Namespace) -> int:
    from memlab.bench.jobs.kv_niah import aggregate, evaluate, policy_specs
    from memlab.models.pretrained import checkpoint_dir, load
    from memlab.tasks.niah import Niah, NiahConfig, exact_match

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length = args.length or (256 if args.smoke else 1024)
    n = args.samples or (2 if args.smoke else 20)
    ratios = args.ratios
    modes = ["agnostic", "aware"]
    window = 8 if args.smoke else 64
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load(args.model, dtype=dtype, device=device)
    task = Niah(NiahConfig(variant="single", length=length, tokenizer=args.model))
    samples = task.samples(tok, n, seed=7)
    entries = [{"name": "full"}]
    for name in MEMLAB_TWIN:
        opts: dict[str, Any] = {"sinks": 4} if name == "streaming" else {
            "window": window, "kernel": 5, "pooling": "avg", "group_reduce": "mean"}
        entries.append({"name": name, "ratio": ratios, "options": opts})
    specs = policy_specs(entries, "kvpress_peer")
    memlab_side = {}
    for mode in modes:
        rows = evaluate(model, tok, samples, specs, model_name=args.model, mode=mode, max_new_tokens=24,
                        batch_size=n)
        memlab_side[mode] = aggregate(rows)
    prompts_file = args.out / "kvpress_prompts.json"
    prompts_file.write_text(json.dumps({
        "checkpoint": str(checkpoint_dir(args.model)), "device": str(device),
        "dtype": str(dtype).split(".")[-1],
        "eos": tok.eos_token_id, "max_new_tokens": 24, "ratios": ratios, "modes": modes, "window": window,
        "prompts": [{"context": s.context_ids.tolist(), "question": s.question_ids.tolist(),
                     "answer": s.answer_ids.tolist()} for s in samples],
    }))
    peer_file = args.out / "kvpress_raw.json"
    env = dict(os.environ)
    paths = [str(args.peer_path)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", "--prompts", str(prompts_file),
                           "--raw", str(peer_file)], env=env, capture_output=True, text=True)
    peer: dict[str, Any] = {"seconds": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        peer["error"] = proc.stderr[-3000:]
    else:
        raw = json.loads(peer_file.read_text())
        peer.update({k: v for k, v in raw.items() if k != "results"})
        table: dict[str, dict[str, Any]] = {}
        full_bytes = {(r["sample"], r["mode"]): r["kv_bytes"] for r in raw["results"]
                      if r["press"] == "none" and "kv_bytes" in r}
        for r in raw["results"]:
            key = f"{r['mode']}/{r['press']}" + (f"@{r['ratio']}" if r["ratio"] is not None else "")
            entry = table.setdefault(key, {"em": [], "loglik": [], "kv_fraction": [], "errors": []})
            if "error" in r:
                entry["errors"].append(r["error"])
                continue
            text = tok.decode(r["tokens"], skip_special_tokens=True)
            entry["em"].append(float(exact_match(text, samples[r["sample"]])))
            entry["loglik"].append(r["loglik"])
            # Held after the prompt, over the uncompressed prompt cache (question included when aware).
            entry["kv_fraction"].append(r["kv_bytes"] / full_bytes[(r["sample"], r["mode"])])
        peer["table"] = {k: {m: (sum(v) / len(v) if v else None) for m, v in e.items() if m != "errors"}
                         | {"errors": e["errors"][:1]} for k, e in table.items()}
    report = {"length": length, "samples": n, "ratios": ratios, "device": str(device), "dtype": str(dtype),
              "memlab": memlab_side, "kvpress": peer,
              "note": "memlab snapkv/pyramidkv use kvpress's settings here: window 64, avg pooling over 5, "
                      "mean over the query heads of a KV head"}
    (args.out / "kvpress_peer.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# memlab vs kvpress, niah single, {length} tokens, {n} prompts, {device}", "",
             "| mode | method | ratio kept | memlab EM | kvpress EM | memlab log-lik | kvpress log-lik |",
             "|---|---|---|---|---|---|---|"]
    for mode in modes:
        for ours, theirs in [("full", "none"), *MEMLAB_TWIN.items()]:
            for ratio in ([None] if ours == "full" else ratios):
                mk = ours if ratio is None else f"{ours}@{ratio:g}"
                pk = f"{mode}/{theirs}" + ("" if ratio is None else f"@{ratio}")
                m = memlab_side[mode].get(mk, {})
                p = peer.get("table", {}).get(pk, {})
                lines.append(f"| {mode} | {ours} / {theirs} | {ratio if ratio else 1.0} | {m.get('em')} | "
                             f"{p.get('em')} | {m.get('loglik')} | {p.get('loglik')} |")
    for mode in modes:
        for name in PRESSES[3:]:
            for ratio in ratios:
                p = peer.get("table", {}).get(f"{mode}/{name}@{ratio}", {})
                lines.append(f"| {mode} | - / {name} | {ratio} | | {p.get('em')} | | {p.get('loglik')} |")
    (args.out / "kvpress_peer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if "error" in peer:
        print("kvpress worker failed:\n" + peer["error"], file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--peer-path", type=Path, default=Path("/tmp/kvpress_site"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.prompts, args.raw)
        return 0
    if args.out is None:
        p.error("--out is required")
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
