"""memlab's `linear_attention`, `based` and `mamba` mixers against flash-linear-attention (fla).

One process, one GPU: (1) training throughput (forward + backward of one layer, bf16) at 2k and 8k
tokens per sequence, with 16k tokens per batch; (2) MQAR recall of a 2-layer LM built from each
layer, same data, same trainer, same seeds. memlab attention (SDPA) is timed beside them as anchor.

fla travels as wheels (flash-linear-attention, fla-core, einops) on PYTHONPATH; nothing of it is
copied here. fla's `Mamba` layer runs its PyTorch slow path when mamba_ssm is absent (it is absent
on our H200 image), so fla's Triton `Mamba2` layer is timed too.

    python benchmarks/mixers_fla.py --out DIR [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from memlab import mixers
from memlab.models.lm import LM
from memlab.tasks import build as build_task
from memlab.train.trainer import TrainConfig, train

D_MODEL, HEADS = 512, 8  # head dim 64 everywhere


class FlaAsMixer(nn.Module):
    """Wraps an fla layer in the Mixer call convention (no state: training and evaluation only)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, *, state=None):
        out = self.layer(x)
        return (out[0] if isinstance(out, tuple) else out), None


def fla_layer(kind: str, d_model: int, heads: int) -> nn.Module:
    from fla.layers import BasedLinearAttention, LinearAttention, Mamba, Mamba2

    if kind == "linear_attention":
        return LinearAttention(
            mode="chunk", hidden_size=d_model, num_heads=heads, feature_map="elu",
            do_feature_map_norm=True, output_norm="identity",
        )
    if kind == "based":
        # mode "parallel" (fla's default): its own Based kernel, which expands the Taylor features
        # inside its tiles. "chunk" (used until 2026-12-05) sends the expanded 273-wide features
        # through the generic chunked linear attention, and never returned within a GPU call
        # (that width is the suspected cause). Under TRITON_INTERPRET=1 "parallel" matches fla's
        # own forward_reference to 2e-6 (B 32, T 256, d 64).
        return BasedLinearAttention(
            hidden_size=d_model, feature_dim=16, num_heads=heads, num_key_value_heads=heads, mode="parallel"
        )
    if kind == "mamba":
        return Mamba(hidden_size=d_model, intermediate_size=2 * d_model, state_size=16)
    if kind == "mamba2":
        return Mamba2(hidden_size=d_model, num_heads=2 * d_model // 64, head_dim=64, expand=2)
    raise ValueError(f"unknown fla kind {kind!r}")


def memlab_options(kind: str, d_model: int) -> tuple[str, dict]:
    """The memlab mixer and options matching each fla layer (heads of dimension 64)."""
    heads = max(1, d_model // 64)
    table = {
        "attention": ("attention", {"n_heads": heads}),
        "linear_attention": ("linear_attention", {"n_heads": heads, "feature_map": "elu"}),
        # fla's Based layer is the Taylor linear attention alone: compare ours with the window
        # branch and the short conv off, and time the full hybrid (window 64 + conv) separately.
        "based": ("based", {"n_heads": heads, "feature_dim": 16, "window": 0, "conv_size": 0}),
        "based_hybrid": ("based", {"n_heads": heads, "feature_dim": 16}),
        # the chunked feature-map form (memlab's Based before its fused Taylor kernel)
        "based_chunked": (
            "based", {"n_heads": heads, "feature_dim": 16, "window": 0, "conv_size": 0, "fused": False}
        ),
        "mamba": ("mamba", {"d_state": 16, "expand": 2}),
    }
    return table[kind]


MEMLAB_KINDS = ("attention", "linear_attention", "based", "based_chunked", "based_hybrid", "mamba")


def memlab_layer(kind: str, d_model: int) -> nn.Module:
    name, opts = memlab_options(kind, d_model)
    return mixers.build(name, d_model=d_model, **opts)


def time_fwd_bwd(layer: nn.Module, b: int, t: int, d: int, reps: int) -> float:
    """Median milliseconds of forward + backward on x: (b, t, d) bf16, CUDA events."""
    x = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(torch.ones_like(y))

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


_SAVE = [lambda: None]  # main() sets it to write the JSON so far
_DEADLINE = [float("inf")]  # set by --budget-s: variants not started by then are recorded as skipped


FLA_KINDS = ("linear_attention", "mamba2", "mamba", "based")
_FLA_KINDS = [FLA_KINDS]  # --fla-kinds: which fla layers to measure, in this order
_VARIANT_S = [0]  # --variant-s: an fla variant runs in a child process killed after this long


def isolated(part: str, impl: str, kind: str, args: dict) -> dict:
    """Run one variant in a child process, killed after --variant-s seconds: fla's Based layer
    never returned in three sessions, and neither a SIGALRM nor anything else in-process could
    stop it. Returns the child's row, or the row with an ``error`` saying how it ended."""
    spec = json.dumps({"part": part, "impl": impl, "kind": kind, **args})
    row: dict = {}
    try:
        done = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True,
                              timeout=_VARIANT_S[0])
    except subprocess.TimeoutExpired:
        return {"error": f"timeout: the variant's process was killed after --variant-s {_VARIANT_S[0]} s"}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            row = json.loads(line[4:])
    if not row:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        row = {"error": f"exit {done.returncode}: " + " | ".join(tail)[:480]}
    return row


def run_one(spec: dict) -> None:
    """--one: measure one variant in this process and print its row (the child of ``isolated``)."""
    if spec["part"] == "throughput":
        row = measure_throughput(spec["impl"], spec["kind"], spec["T"], spec["B"], spec["smoke"])
    else:
        row = measure_mqar(spec["impl"], spec["kind"], spec["smoke"], spec.get("recipe", "single"))
    print("ROW " + json.dumps(row), flush=True)


def _out_of_time(row: dict) -> bool:
    if time.perf_counter() < _DEADLINE[0]:
        return False
    row["error"] = "skipped: --budget-s spent before this variant started"
    return True


def measure_throughput(impl: str, kind: str, t: int, b: int, smoke: bool) -> dict:
    """Forward + backward of one layer on (b, t, D_MODEL) bf16: ms and tokens/s, or an error."""
    row: dict = {}
    try:
        torch.manual_seed(0)
        if impl == "memlab":
            layer = memlab_layer(kind, D_MODEL)
            row["options"] = memlab_options(kind, D_MODEL)[1]
        else:
            layer = fla_layer(kind, D_MODEL, HEADS)
        layer = layer.cuda().to(torch.bfloat16)
        reps = 3 if (impl, kind) == ("fla", "mamba") else (5 if smoke else 20)
        ms = time_fwd_bwd(layer, b, t, D_MODEL, reps)
        row.update(ms=ms, tokens_per_s=b * t / ms * 1e3)
    except Exception as exc:  # a failed variant is recorded, never dropped
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return row


def throughput(smoke: bool, rows: list[dict]) -> list[dict]:
    tokens = 4096 if smoke else 16384
    for t in (512,) if smoke else (2048, 8192):
        b = max(1, tokens // t)
        entries = [("memlab", k) for k in MEMLAB_KINDS] + [
            # fla's BasedLinearAttention did not return within two H200 calls (its Triton kernels
            # compiling or hanging on this image): last, so that it cannot cost the other rows.
            ("fla", k) for k in _FLA_KINDS[0]
        ]
        for impl, kind in entries:
            row = {"impl": impl, "layer": kind, "T": t, "B": b, "d_model": D_MODEL}
            if (impl, kind, t) == ("fla", "mamba", 8192):
                # Without mamba_ssm, fla's Mamba runs a per-token PyTorch loop: the 2k row already
                # shows that path; at 8k it would take minutes of the call for no new information.
                row["error"] = "skipped: fla Mamba slow path (mamba_ssm absent); see the T=2048 row"
                rows.append(row)
                continue
            if _out_of_time(row):
                rows.append(row)
                continue
            if impl == "fla" and _VARIANT_S[0] > 0:
                row.update(isolated("throughput", impl, kind, {"T": t, "B": b, "smoke": smoke}))
            else:
                row.update(measure_throughput(impl, kind, t, b, smoke))
            print(row, flush=True)
            rows.append(row)
            _SAVE[0]()  # a variant that hangs or kills the process must not take the rows before it
            torch.cuda.empty_cache()
    return rows


MQAR_D = 128
MQAR_SHORT_CONV = 4


MQAR_RECIPES = ("single", "curriculum")
_MQAR_KINDS = [MEMLAB_KINDS]  # --mqar-kinds
_MQAR_DEVICE = ["cuda"]  # a CPU check of the MQAR part may set it to "cpu" (memlab layers only)
_MQAR_RECIPE = ["single"]  # --mqar-recipe


@functools.cache
def mqar_setup(smoke: bool, recipe: str = "single") -> tuple:
    """The shared MQAR configuration: train sets, test sets (name -> set; other seeds) and the
    trainer config. ``single``: 20k sequences of (256 tokens, 16 pairs), batch 128, lr 1e-3, 6
    epochs or 25 s (runs c-e). ``curriculum``: the `mqar_h200` suite's train mix, (64, 4) to
    (256, 64) with 10k sequences each, batch 256, lr 2.15e-3, weight decay 0.1, clipping 1.0, 6
    epochs or 45 s, tested at the five train configurations: on the single configuration every
    sub-quadratic layer stayed at chance (run e), while in the suite Based reached 0.89 at (256, 16)."""
    if recipe == "single":
        task = build_task("mqar", vocab_size=8192, seq_len=256, num_pairs=16)
        n_train = 2000 if smoke else 20000
        # The same 25 s training cap for every model (the schedule follows it).
        cfg = TrainConfig(lr=1e-3, epochs=2 if smoke else 6, batch_size=128, warmup_steps=50,
                          target_accuracy=0.99, seed=0, progress=False, max_train_s=None if smoke else 25.0)
        return [task.make(n_train, seed=0)], {"test": task.make(1000, seed=1)}, cfg
    if recipe != "curriculum":
        raise ValueError(f"recipe must be one of {MQAR_RECIPES}, got {recipe!r}")
    shapes = [(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]
    n_train, n_test = (500, 100) if smoke else (10000, 1000)
    train_sets, test_sets = [], {}
    for i, (length, pairs) in enumerate(shapes):
        task = build_task("mqar", vocab_size=8192, seq_len=length, num_pairs=pairs)
        train_sets.append(task.make(n_train, seed=10 + i))
        test_sets[f"L{length} kv{pairs}"] = task.make(n_test, seed=100 + i)
    cfg = TrainConfig(lr=2.1544e-3, epochs=2 if smoke else 6, batch_size=256, warmup_steps=0,
                      weight_decay=0.1, grad_clip=1.0, target_accuracy=0.99, seed=0, progress=False,
                      max_train_s=None if smoke else 45.0)
    return train_sets, test_sets, cfg


def warm_up(model: nn.Module, train_sets: list, test_sets: dict, batch_size: int) -> None:
    """Compile and autotune every kernel at the training and evaluation shapes before the training
    cap starts: in run d memlab's Taylor kernel spent most of its cap compiling, and fla's chunk
    kernels autotune for ~200 s on a cold cache. No optimiser step: the weights stay as initialised."""
    dev = _MQAR_DEVICE[0]
    model.to(dev).train()
    for data in {d.inputs.shape[1]: d for d in train_sets}.values():
        out = model(data.inputs[:batch_size].to(dev))
        (out[0] if isinstance(out, tuple) else out).float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for data in test_sets.values():
            for n in {batch_size, len(data) % batch_size or batch_size}:
                model(data.inputs[:n].to(dev))
    if dev == "cuda":
        torch.cuda.synchronize()


def measure_mqar(impl: str, kind: str, smoke: bool, recipe: str = "single") -> dict:
    """A 2-layer LM of this layer trained on the shared MQAR configuration: accuracy, or an error."""
    train_sets, test_sets, cfg = mqar_setup(smoke, recipe)
    row: dict = {}
    try:
        torch.manual_seed(0)
        # A 4-tap short convolution before every layer, memlab's and fla's alike (the mqar suites'
        # setting): without it attention itself stayed at 0.05 here (run c, 2026-12-05).
        model = LM.from_mixer("attention", vocab_size=8192, d_model=MQAR_D, n_layers=2, n_heads=2,
                              short_conv=MQAR_SHORT_CONV)
        for block in model.blocks:
            block.mixer = memlab_layer(kind, MQAR_D) if impl == "memlab" else FlaAsMixer(
                fla_layer(kind, MQAR_D, 2)
            )
        warm_up(model, train_sets, test_sets, cfg.batch_size)
        t0 = time.perf_counter()
        res = train(model, train_sets, test_sets, cfg, _MQAR_DEVICE[0])
        acc = res.eval_accuracy
        row.update(accuracy=acc["test"] if "test" in acc else sum(acc.values()) / len(acc),
                   epochs=res.epochs_run, steps=res.steps, stopped_by_time=res.stopped_by_time,
                   tokens_per_s=res.tokens_per_s, wall_s=time.perf_counter() - t0)
        if "test" in acc:
            row["best"] = res.best_accuracy["test"]
        else:
            row.update(recipe=recipe, accuracy_per_test=dict(acc))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return row


def mqar(smoke: bool, rows: list[dict]) -> list[dict]:
    memlab_rows = [("memlab", k) for k in _MQAR_KINDS[0]]
    fla_rows = [("fla", k) for k in _FLA_KINDS[0] if k != "mamba"]  # fla's Mamba: per-token slow path
    for impl, kind in memlab_rows + fla_rows:  # fla's Based last: see throughput()
        row = {"impl": impl, "layer": kind, "d_model": MQAR_D, "short_conv": MQAR_SHORT_CONV,
               **({"seq_len": 256, "num_pairs": 16} if _MQAR_RECIPE[0] == "single" else
                  {"recipe": _MQAR_RECIPE[0]})}
        if _out_of_time(row):
            rows.append(row)
            continue
        if impl == "fla" and _VARIANT_S[0] > 0:
            row.update(isolated("mqar", impl, kind, {"smoke": smoke, "recipe": _MQAR_RECIPE[0]}))
        else:
            row.update(measure_mqar(impl, kind, smoke, _MQAR_RECIPE[0]))
        print(row, flush=True)
        rows.append(row)
        _SAVE[0]()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", choices=["throughput", "mqar"], default=None,
                    help="run one part (the two parts can then run on two GPUs at once)")
    ap.add_argument("--skip-mqar", action="store_true", help="same as --only throughput")
    ap.add_argument("--variant-s", type=int, default=0,
                    help="run each fla variant in a child process killed after this many s (0: in-process)")
    ap.add_argument("--fla-kinds", default=",".join(FLA_KINDS),
                    help=f"comma-separated fla layers to measure, in order (of {', '.join(FLA_KINDS)})")
    ap.add_argument("--mqar-recipe", choices=MQAR_RECIPES, default="single",
                    help="the shared MQAR configuration (see mqar_setup)")
    ap.add_argument("--mqar-kinds", default=None,
                    help="comma-separated memlab layers for the MQAR part (default: all of MEMLAB_KINDS)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one variant (JSON spec)
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no variant after this many seconds (the rest are recorded as skipped)")
    args = ap.parse_args()
    if args.one is not None:
        run_one(json.loads(args.one))
        return
    _DEADLINE[0] = time.perf_counter() + args.budget_s
    _VARIANT_S[0] = args.variant_s
    _MQAR_RECIPE[0] = args.mqar_recipe

    def subset(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        picked = tuple(k for k in text.split(",") if k)
        unknown = [k for k in picked if k not in allowed]
        if unknown:
            ap.error(f"{flag}: {unknown} unknown; expected a comma-separated subset of {', '.join(allowed)}")
        return picked

    if args.mqar_kinds is not None:
        _MQAR_KINDS[0] = subset("--mqar-kinds", args.mqar_kinds, MEMLAB_KINDS)
    _FLA_KINDS[0] = subset("--fla-kinds", args.fla_kinds, FLA_KINDS)
    if args.skip_mqar:
        args.only = "throughput"
    import fla
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "mixers_fla",
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "fla": getattr(fla, "__version__", "?"), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "throughput": [],
    }

    def save() -> None:
        (out / "mixers_fla.json").write_text(json.dumps(result, indent=1))

    _SAVE[0] = save
    if args.only != "mqar":
        result["throughput"] = throughput(args.smoke, result["throughput"])
        save()
    if args.only != "throughput":
        result["mqar"] = []
        mqar(args.smoke, result["mqar"])
        save()
    print("\nlayer fwd+bwd tokens/s (bf16, d_model 512):")
    for r in result["throughput"]:
        print(f"  {r['impl']:7s} {r['layer']:17s} T={r['T']:5d} "
              + (f"{r['tokens_per_s']/1e6:8.2f} M tok/s" if "tokens_per_s" in r else r.get("error", "")))
    for r in result.get("mqar", []):
        print(f"  mqar {r['impl']:7s} {r['layer']:17s} acc={r.get('accuracy', r.get('error'))}")


if __name__ == "__main__":
    main()
