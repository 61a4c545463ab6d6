"""memlab's `titans_mac` LM against titans-pytorch's MemoryAsContextTransformer, in one process.

Both models get the same shapes (vocabulary, width, depth, heads and head dimension, segment
length, persistent tokens, a 2-layer memory MLP of expansion 4 per head, momentum, maximum inner
learning rate), the same data (MQAR and passkey, memlab's generators and seeds), the same trainer
(memlab's AdamW loop, fp32, same learning rate, batch and number of steps), and are measured the
same way:
- recall: MQAR accuracy and passkey digit accuracy / exact match at the train length and longer;
- training throughput: forward + backward tokens/s at each task's train shape (CUDA events,
  median) and the trainer's tokens/s including the optimizer;
- decoding: seconds per generated token after a batch-1 prefill, each model through its own
  cache (memlab: the mixer states; titans-pytorch: its KV + neural-memory cache, where a segment
  boundary also runs its long-term memory slots, all counted in the token that triggers them).

What cannot be matched is kept as each library designs it and written into the JSON: titans-pytorch
adds learned long-term memory tokens to every segment, axial position embeddings, value residual
and untied embeddings; memlab reads one memory token per segment query and ties the embeddings.

The number of training tokens is set from the slower model's measured forward + backward throughput
so that each training takes about ``--train-budget`` seconds (capped per task); both models train
on exactly the same sequences, in the same order. The passkey mix is the passkey suite's: about
10% of the tokens in 128-token sequences that bootstrap the retrieval, the rest at 1024.

titans-pytorch is imported from PYTHONPATH (its wheels are installed next to, not into, memlab's
environment); memlab is imported from this checkout. Nothing of titans-pytorch is copied here.

    PYTHONPATH=/path/to/titans/site-packages python benchmarks/titans_peer.py --out DIR [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # memlab from this checkout

from memlab import tasks  # noqa: E402
from memlab.bench.jobs.passkey import prefill_and_decode, score_passkey  # noqa: E402
from memlab.bench.measure import environment, median_time, package_versions  # noqa: E402
from memlab.models.lm import LM, LMConfig  # noqa: E402
from memlab.train import TrainConfig, evaluate, seed_everything, train  # noqa: E402

FULL = {
    "d_model": 128,
    "n_layers": 2,
    "n_heads": 2,  # head dim 64
    "segment": 64,  # memlab chunk_size (segment and memory chunk); titans-pytorch segment_len
    "n_persistent": 4,
    "mem_depth": 2,
    "mem_expansion": 4,
    "lr_max": 0.1,  # largest inner (test-time) learning rate
    "peer_longterm_tokens": 16,  # titans-pytorch's learned memory tokens per segment (README example)
    "lr": 1e-3,
    "mqar": {
        "task": {"vocab_size": 8192, "power_a": 0.01, "random_non_queries": True},
        "train": [{"seq_len": 256, "num_pairs": 16, "tokens": 1.0}],
        "tests": [{"seq_len": 256, "num_pairs": 16, "n": 1000}, {"seq_len": 512, "num_pairs": 32, "n": 500}],
        "batch_size": 64,
        "max_tokens": 10_000_000,
    },
    "passkey": {
        "task": {"key_len": 5, "filler": "repeat", "period": 32, "filler_vocab": 32},
        # as in the passkey suite: a short set bootstraps the retrieval (about 10% of the tokens)
        "train": [{"seq_len": 128, "tokens": 0.1}, {"seq_len": 1024, "tokens": 0.9}],
        "tests": [{"seq_len": 1024, "n": 256}, {"seq_len": 4096, "n": 64}],
        "batch_size": 16,
        "max_tokens": 16_000_000,
    },
    "decode": {"lengths": [1024, 4096], "steps": 64, "warmup": 4},
    "throughput_steps": 5,
}
# The passkey_memory_cpu suite's scale (docs/results.md, "Passkey on the CPU"), where memlab's
# Titans MAG learned the task on the CPU: a recall comparison that fits the CPU machine.
CPU = {
    **FULL,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 1,
    "segment": 16,
    "peer_longterm_tokens": 4,
    "lr": 3e-3,
    "mqar": {
        "task": {"vocab_size": 256, "power_a": 0.01, "random_non_queries": True},
        "train": [{"seq_len": 64, "num_pairs": 8, "tokens": 1.0}],
        "tests": [{"seq_len": 64, "num_pairs": 8, "n": 256}, {"seq_len": 128, "num_pairs": 16, "n": 256}],
        "batch_size": 32,
        "max_tokens": 4_000_000,
    },
    "passkey": {
        "task": {"key_len": 5, "filler": "repeat", "period": 32, "filler_vocab": 32},
        "train": [{"seq_len": 64, "tokens": 0.33}, {"seq_len": 256, "tokens": 0.67}],
        "tests": [{"seq_len": 256, "n": 128}, {"seq_len": 1024, "n": 32}, {"seq_len": 2048, "n": 32}],
        "batch_size": 32,
        "max_tokens": 8_000_000,
    },
    "decode": {"lengths": [256, 2048], "steps": 16, "warmup": 2},
    "throughput_steps": 3,
}
SMOKE = {
    **FULL,
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "segment": 8,
    "peer_longterm_tokens": 2,
    "mqar": {
        "task": {"vocab_size": 64, "power_a": 0.01, "random_non_queries": True},
        "train": [{"seq_len": 32, "num_pairs": 4, "tokens": 1.0}],
        "tests": [{"seq_len": 32, "num_pairs": 4, "n": 16}, {"seq_len": 64, "num_pairs": 8, "n": 8}],
        "batch_size": 8,
        "max_tokens": 1024,
    },
    "passkey": {
        "task": {"key_len": 2, "filler": "repeat", "period": 8, "filler_vocab": 8},
        "train": [{"seq_len": 16, "tokens": 0.5}, {"seq_len": 48, "tokens": 0.5}],
        "tests": [{"seq_len": 48, "n": 8}, {"seq_len": 96, "n": 4}],
        "batch_size": 8,
        "max_tokens": 1536,
    },
    "decode": {"lengths": [48, 96], "steps": 4, "warmup": 1},
    "throughput_steps": 2,
}


# -- the two models -------------------------------------------------------------------------
def memlab_model(cfg: dict[str, Any], vocab: int, short_conv: int = 0, compiled: bool = False) -> LM:
    """``short_conv``: memlab LM's causal depthwise convolution before every mixer (the passkey
    suites use 4 taps); titans-pytorch has no such layer, so only 0 is matched. ``compiled``: the
    memory's segment step through torch.compile (``mem_compile``; the same function)."""
    spec = {
        "mixer": "titans_mac",
        "mem_compile": compiled,
        "n_heads": cfg["n_heads"],
        "chunk_size": cfg["segment"],
        "n_persistent": cfg["n_persistent"],
        "mem_depth": cfg["mem_depth"],
        "mem_expansion": cfg["mem_expansion"],
        "lr_max": cfg["lr_max"],
    }
    layers = [dict(spec) for _ in range(cfg["n_layers"])]
    return LM(LMConfig(vocab_size=vocab, d_model=cfg["d_model"], layers=layers, short_conv=short_conv))


class PeerLM(nn.Module):
    """titans-pytorch's MAC transformer behind memlab's LM call: ids (B, T) -> (logits (B, T, V), [])."""

    def __init__(self, cfg: dict[str, Any], vocab: int) -> None:
        super().__init__()
        from titans_pytorch import MemoryAsContextTransformer, MemoryMLP

        head_dim = cfg["d_model"] // cfg["n_heads"]
        self.net = MemoryAsContextTransformer(
            num_tokens=vocab,
            dim=cfg["d_model"],
            depth=cfg["n_layers"],
            segment_len=cfg["segment"],
            num_persist_mem_tokens=cfg["n_persistent"],
            num_longterm_mem_tokens=cfg["peer_longterm_tokens"],
            dim_head=head_dim,
            heads=cfg["n_heads"],
            ff_mult=4,
            num_residual_streams=1,  # memlab's LM has one residual stream
            neural_memory_model=MemoryMLP(
                dim=head_dim, depth=cfg["mem_depth"], expansion_factor=cfg["mem_expansion"]
            ),
            neural_memory_kwargs={
                "heads": cfg["n_heads"],
                "dim_head": head_dim,
                "momentum": True,
                "default_step_transform_max_lr": cfg["lr_max"],
            },
            use_flex_attn=False,
        )

        # titans-pytorch makes its per-head initial memory weights by broadcasting one tensor over
        # the heads (a zero-stride view), which no in-place optimizer step can update; they are
        # meant to be learned per head, so each head gets its own copy of the same initial values.
        self.materialized = []
        for name, p in self.net.named_parameters():
            if 0 in p.stride():
                p.data = p.data.contiguous()
                self.materialized.append(name)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
        return self.net(ids), []


@torch.no_grad()
def peer_prefill_and_decode(
    model: PeerLM, ids: torch.Tensor, *, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Prefill ids (1, L) through titans-pytorch's cached path, then decode greedily, timing each token.

    A generated token's time covers every call it needs: at a segment boundary titans-pytorch runs
    its long-term memory slots one call each (they return no logits) before the next token.
    ``cached_matches_forward`` is the fraction of generated tokens equal to the argmax of a full
    forward pass over the same sequence (memlab's mixers are held to equality by the tests).
    """
    net = model.net
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    try:
        ids = ids.to(device)
        total = ids.shape[1] + warmup + steps + 1
        # the sampler's own trick: positional factors for the final length, computed once
        with_mem = net.seq_len_with_longterm_mem(total)
        dims = net.axial_pos_emb.maybe_derive_outer_dim(with_mem, (net.neural_memory_segment_len,))
        pos = net.axial_pos_emb(dims, return_factorized=True)

        def call(seq: torch.Tensor, cache: Any) -> tuple[torch.Tensor | None, Any]:
            return net(seq, cache=cache, return_cache=True, disable_flex_attn=True, factorized_pos_emb=pos)

        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits, cache = call(ids, None)
        if cuda:
            torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - t0
        seq = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)

        def token(seq: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
            while True:
                logits, cache = call(seq, cache)
                if logits is not None:
                    return torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1), cache

        for _ in range(warmup):
            seq, cache = token(seq, cache)
        times = []
        for _ in range(steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                seq, cache = token(seq, cache)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                seq, cache = token(seq, cache)
                times.append(time.perf_counter() - t)
        state_bytes = _nbytes(cache)
        # Does the cached path compute the model's function? Compare each generated token with the
        # argmax of one full forward pass over the same tokens.
        n_new = seq.shape[1] - ids.shape[1]
        full = net(seq[:, :-1], disable_flex_attn=True)[:, ids.shape[1] - 1 :].argmax(-1)
        agreement = float((full == seq[:, ids.shape[1] :]).float().mean())
    finally:
        model.train(was_training)
    return {
        "state_bytes": state_bytes,
        "prefill_s": prefill_s,
        "decode_mean_s": statistics.fmean(times),
        "decode_median_s": statistics.median(times),
        "decode_steps": steps,
        "generated": n_new,
        "cached_matches_forward": agreement,
    }


def _nbytes(obj: Any) -> int:
    """Bytes of every tensor inside a nested cache (tuples, lists, dicts, named tuples, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(v) for v in vars(obj).values())
    return 0


# -- measurements ---------------------------------------------------------------------------
def fwd_bwd_tokens_per_s(
    model: nn.Module, vocab: int, batch: int, seq_len: int, *, steps: int, device: torch.device
) -> float:
    """Forward + backward tokens/s of a (batch, seq_len) batch: median step after 2 warm-up steps."""
    model.to(device).train()
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(ids)[0]
        logits.float().logsumexp(-1).mean().backward()

    seconds = median_time(step, device=device, warmup=2, repeats=steps)
    model.zero_grad(set_to_none=True)
    return batch * seq_len / seconds


def attempt(results: dict[str, Any], key: str, fn: Callable[[], Any], device: torch.device) -> Any:
    """Run one measurement; a failure is stored under ``key`` with its error, never dropped."""
    try:
        value = fn()
    except Exception as exc:
        results[key] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
        results[key]["traceback"] = traceback.format_exc()[-2000:]
        print(f"  {key}: FAILED {results[key]['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    results[key] = value
    return value


def run_task(
    kind: str,
    cfg: dict[str, Any],
    models: dict[str, Callable[[int], nn.Module]],
    *,
    device: torch.device,
    train_budget_s: float,
    results: dict[str, Any],
    train_tokens: float | None = None,
    epochs: int = 1,
) -> dict[str, nn.Module]:
    """Size the data from the slower model (or take ``train_tokens`` per epoch), train every model
    on it for ``epochs`` passes, test them all; returns the trained models."""
    tcfg = cfg[kind]
    out: dict[str, Any] = {"config": tcfg}
    results[kind] = out

    def make_task(extra: dict[str, Any]) -> tasks.Task:
        return tasks.build(kind, **tcfg["task"], **extra)

    sets = tcfg["train"]
    shape = {k: v for k, v in max(sets, key=lambda t: t["seq_len"]).items() if k != "tokens"}
    vocab = make_task(shape).vocab_size
    seq_len = shape["seq_len"]
    speeds: dict[str, float] = {}
    for name, factory in models.items():
        seed_everything(0)
        model = factory(vocab)
        tps = attempt(
            out,
            f"{name}.fwd_bwd_tokens_per_s",
            lambda model=model: fwd_bwd_tokens_per_s(
                model, vocab, tcfg["batch_size"], seq_len, steps=cfg["throughput_steps"], device=device
            ),
            device,
        )
        if tps:
            speeds[name] = tps
        del model
    # Token budget from the slower model at the longest train shape; the optimizer and the
    # evaluation cost on top of forward + backward, so 70% of the time goes to the steps.
    slowest = min(speeds.values()) if speeds else 0.0
    budget = train_tokens or min(tcfg["max_tokens"], 0.7 * train_budget_s * slowest / epochs)
    train_data = []
    for j, spec in enumerate(sets):
        extra = {k: v for k, v in spec.items() if k != "tokens"}
        n = max(tcfg["batch_size"], int(budget * spec["tokens"] / spec["seq_len"]))
        train_data.append(make_task(extra).make(n, seed=2 * j))  # even seeds for training
    out["train_sets"] = [{"seq_len": d.seq_len, "num_examples": len(d)} for d in train_data]
    print(
        f"{kind}: training on {out['train_sets']} (slowest {slowest:,.0f} tok/s at {seq_len} tokens)",
        flush=True,
    )
    tests = {}
    for j, t in enumerate(tcfg["tests"]):
        extra = {k: v for k, v in t.items() if k != "n"}
        name = " ".join(f"{k}={v}" for k, v in extra.items())
        task = make_task(extra)
        tests[name] = (task, task.make(t["n"], seed=1 + 2 * j))  # odd seeds: never a train seed
    trained: dict[str, nn.Module] = {}
    for name, factory in models.items():
        seed_everything(0)
        model = factory(vocab)
        mres: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
        out[name] = mres
        tc = TrainConfig(
            lr=cfg["lr"], epochs=epochs, batch_size=tcfg["batch_size"], warmup_steps=20, seed=0,
            progress=False,
        )
        res = attempt(
            mres, "train", lambda model=model, tc=tc: train(model, train_data, {}, tc, device), device
        )
        if res is None:
            continue
        mres["train"] = {
            "tokens_per_s": res.tokens_per_s,
            "steps": res.steps,
            "final_loss": res.losses[-1] if res.losses else None,
            "wall_s": res.wall_s,
            "peak_memory_bytes": res.peak_memory_bytes,
        }
        for tname, (task, data) in tests.items():
            batch = max(1, tcfg["batch_size"] * seq_len // data.seq_len)  # same tokens per batch
            if kind == "passkey":
                attempt(
                    mres,
                    f"test {tname}",
                    lambda model=model, task=task, data=data, batch=batch: score_passkey(
                        model, task, data, batch_size=batch, depth_bins=4, device=device
                    ),
                    device,
                )
            else:
                attempt(
                    mres,
                    f"test {tname}",
                    lambda model=model, data=data, batch=batch: {
                        "accuracy": evaluate(model, data, batch_size=batch, device=device)
                    },
                    device,
                )
        print(f"  {name}: " + json.dumps({k: v for k, v in mres.items() if k.startswith("test")}), flush=True)
        trained[name] = model
    return trained


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for titans_peer.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--cpu-scale", action="store_true",
                    help="d_model 64, passkey trained at 64+256 tokens and tested to 2048 (CPU machine)")
    ap.add_argument("--device", default=None, help="default: cuda when present (cpu with --smoke)")
    ap.add_argument("--train-budget", type=float, default=55.0, help="seconds per training (4 trainings)")
    ap.add_argument("--tasks", nargs="+", choices=["mqar", "passkey"], default=["mqar", "passkey"])
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training data (same for all)")
    ap.add_argument("--train-tokens", type=float, default=None,
                    help="training tokens per epoch for every model (default: from --train-budget)")
    ap.add_argument("--memlab-short-conv", type=int, nargs="+", default=[0], metavar="K",
                    help="one memlab model per value: its LM's short convolution taps (0: none, matched)")
    ap.add_argument("--memlab-compile", action="store_true",
                    help="also a compiled twin of every memlab model (mem_compile; label suffix _compiled)")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.train_tokens is not None and args.train_tokens <= 0:
        ap.error(f"--train-tokens must be > 0, got {args.train_tokens}")
    if any(k < 0 for k in args.memlab_short_conv):
        ap.error(f"--memlab-short-conv values must be >= 0, got {args.memlab_short_conv}")
    try:
        import titans_pytorch  # noqa: F401
    except ImportError as exc:
        print(
            f"titans_pytorch is not importable ({exc}); put its site-packages on PYTHONPATH", file=sys.stderr
        )
        return 2
    cfg = SMOKE if args.smoke else CPU if args.cpu_scale else FULL
    if args.smoke:
        device = torch.device(args.device or "cpu")
        budget = min(args.train_budget, 5.0)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        budget = args.train_budget
    if device.type == "cuda":
        # TF32 matmuls for both models alike: the comparison stays in one process and one setting.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def save(done: bool) -> None:
        """Written after every stage, so a run stopped by its time limit keeps what it measured."""
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "titans_peer",
            "command": " ".join(["python", "benchmarks/titans_peer.py", *(argv or sys.argv[1:])]),
            "smoke": args.smoke,
            "environment": environment(device),
            "peer_versions": package_versions(
                ("titans-pytorch", "x-transformers", "hyper-connections", "einops")
            ),
            "config": cfg,
            "matched": "vocab, d_model, depth, heads, head dim, segment length, persistent tokens, "
            "memory MLP (depth 2, expansion 4, per head), momentum, max inner lr, data, trainer, lr, "
            "batch, steps",
            "not_matched": "titans-pytorch: learned long-term memory tokens per segment "
            f"({cfg['peer_longterm_tokens']}), axial position embedding, value residual, untied embeddings, "
            "memory chunk = segment + memory tokens; memlab: one memory token per segment query M(q), "
            "output gate from the memory, rotary positions, tied embeddings; memlab_convK models: a K-tap "
            "causal depthwise convolution before every mixer (memlab's passkey suites use 4)",
            "peer_adjustment": "titans-pytorch's per-head initial memory weights are zero-stride views "
            "(one tensor broadcast over heads) that in-place optimizer steps reject; each head gets its own "
            "copy of the same initial values before training",
            "train_budget_s": budget,
            "train_tokens_per_epoch": args.train_tokens,
            "epochs": args.epochs,
            "memlab_short_conv": args.memlab_short_conv,
            "memlab_compile": args.memlab_compile,
            "wall_s": time.perf_counter() - t0,
            "results": results,
        }
        payload["complete"] = done
        path = out_dir / "titans_peer.json"
        path.write_text(json.dumps(payload, indent=2, default=str))
        if done:
            print(f"wrote {path} in {payload['wall_s']:.0f} s")

    t0 = time.perf_counter()
    models: dict[str, Callable[[int], nn.Module]] = {
        ("memlab" if k == 0 else f"memlab_conv{k}"): (lambda v, k=k: memlab_model(cfg, v, short_conv=k))
        for k in args.memlab_short_conv
    }
    if args.memlab_compile:
        for k in args.memlab_short_conv:
            label = ("memlab" if k == 0 else f"memlab_conv{k}") + "_compiled"
            models[label] = lambda v, k=k: memlab_model(cfg, v, short_conv=k, compiled=True)
    models["titans_pytorch"] = lambda v: PeerLM(cfg, v)
    results: dict[str, Any] = {}
    trained: dict[str, nn.Module] = {}
    for kind in args.tasks:
        trained = run_task(kind, cfg, models, device=device, train_budget_s=budget, results=results,
                           train_tokens=args.train_tokens, epochs=args.epochs)
        save(False)

    if "passkey" not in args.tasks:  # decoding is timed on passkey prompts, with passkey-trained models
        save(True)
        return 0
    decode: dict[str, Any] = {}
    results["decode"] = decode
    passkey = tasks.build("passkey", **cfg["passkey"]["task"], seq_len=max(cfg["decode"]["lengths"]))
    prompt = passkey.make(1, seed=99).inputs
    for length in cfg["decode"]["lengths"]:
        ids = prompt[:, :length]
        for name, model in trained.items():
            fn = prefill_and_decode if name.startswith("memlab") else peer_prefill_and_decode
            attempt(
                decode,
                f"{name} L{length}",
                lambda fn=fn, model=model, ids=ids: {
                    k: v
                    for k, v in fn(
                        model,
                        ids,
                        steps=cfg["decode"]["steps"],
                        warmup=cfg["decode"]["warmup"],
                        device=device,
                    ).items()
                    if k != "read_counters"
                },
                device,
            )
        print(
            f"decode L{length}: " + json.dumps({k: v for k, v in decode.items() if k.endswith(f"L{length}")})
        )
    save(True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
