"""Run kind ``passkey``: train an LM from scratch on passkey retrieval at the train lengths, then test
it at longer lengths: accuracy vs length, state bytes after a prefill, decode latency per token.

The section grammar is the ``mqar`` kind's (d_model / lr / seed axes, ``train_sets``,
``test_sets``, ``[[<section>.mixers]]`` rows with options and sweeps; see ``jobs/mqar.py``) with
``task = "passkey"`` by default and three additions:

    measure = { eval_tokens = 32768, decode_steps = 32, decode_warmup = 4, depth_bins = 5 }
    [[passkey.mixers]]
    name = "landmark"
    options = { block_size = 64 }
    test_options = { mode = "topk", top_k = 4 }   # options that change at test time only
    [[passkey.mixers]]
    name = "memmamba"
    options = { n_layers = 2 }
    lm_layers = 1             # this row's LM depth, instead of the section's n_layers

``test_options`` rebuild the trained model with other inference options and the same weights
(Landmark Attention trains with every block and retrieves the top-k blocks at inference); an
option that changes the parameters fails the strict weight load. ``lm_layers`` gives one row its
own LM depth: a mixer that stacks layers inside itself (MemMamba's cross-layer attention needs
the pools of the layers below it in the same mixer) can match the others' number of layers.

Per test set the run records, with the model in eval mode:
- ``accuracy``: fraction of answer digits predicted (teacher forcing, pooled over sequences);
- ``exact_match``: fraction of sequences with every digit right, i.e. answered by greedy decoding,
  overall and per needle-depth bin (``depth_bins`` equal bins over [0, 1]);
- ``state_bytes``: bytes of every state tensor of every layer after a batch-1 prefill at that length;
- ``decode``: seconds per generated token when decoding ``decode_steps`` tokens greedily from that
  prefill state (after ``decode_warmup`` untimed steps), each step timed alone with CUDA events on
  a GPU and ``time.perf_counter`` on a CPU; mean and median, because mixers that update a memory
  once per chunk pay that update on one step in ``chunk_size`` and only the mean shows it;
- read counters of mixers that keep them (Landmark's ``stats``: landmarks scanned, tokens
  retrieved per decoding step).
A test length that runs out of device memory is recorded with its error and the run goes on with
the other lengths: a mixer that cannot reach 64k tokens still has its 1k-16k numbers.

Evaluation runs ``max(1, eval_tokens // seq_len)`` sequences per batch. The early-stopping
target (``train.target_accuracy``) looks only at the test sets no longer than the longest train
set, so that a run never trains on a signal from the extrapolation lengths.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from memlab import mixers
from memlab.bench.jobs.base import Overrides, RunContext, check_keys, register_job
from memlab.bench.jobs.mqar import (
    MQARJob,
    _build_task,
    best_lr_runs,
    line_key,
    set_name,
)
from memlab.bench.jobs.training_summary import training_end, training_metrics
from memlab.bench.measure import peak_memory
from memlab.bench.report import (
    Figure,
    Panel,
    ReportSection,
    Series,
    Table,
    format_bytes,
    format_value,
    save_panels,
)
from memlab.bench.store import RunRecord
from memlab.models.lm import LM
from memlab.registry import make_config
from memlab.tasks import IGNORE_INDEX, TokenData
from memlab.tasks.passkey import Passkey
from memlab.train import TrainConfig, seed_everything, train

MEASURE_DEFAULTS: dict[str, int] = {
    "eval_tokens": 32768,
    "decode_steps": 32,
    "decode_warmup": 4,
    "depth_bins": 5,
}
_MEASURE_MIN = {"eval_tokens": 1, "decode_steps": 1, "decode_warmup": 0, "depth_bins": 1}


def check_measure(value: Any, where: str) -> dict[str, int]:
    """The section's ``measure`` table with defaults filled in; bad keys or values raise ValueError."""
    check_keys(value, set(MEASURE_DEFAULTS), f"{where} measure")
    out = dict(MEASURE_DEFAULTS)
    for key, v in value.items():
        low = _MEASURE_MIN[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{where} measure.{key} must be an int >= {low}, got {v!r}")
        out[key] = v
    return out


# -- measurements -------------------------------------------------------------------------------
@torch.no_grad()
def score_passkey(
    model: torch.nn.Module,
    task: Passkey,
    data: TokenData,
    *,
    batch_size: int,
    depth_bins: int,
    device: torch.device,
) -> dict[str, Any]:
    """Digit accuracy, exact match and exact match per needle-depth bin of ``data`` (N, L).

    ``task`` must be the passkey task that made ``data`` (it locates the needles). The model is
    called as ``model(ids) -> (logits, states)`` with ids (B, L) and logits (B, L, V).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    depth = task.depth(data.inputs)  # (N,)
    bins = torch.clamp((depth * depth_bins).long(), max=depth_bins - 1)
    correct_digits = labelled = 0
    exact = torch.zeros(len(data), dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(data), batch_size):
            x = data.inputs[i : i + batch_size].to(device)
            y = data.targets[i : i + batch_size].to(device)
            logits = model(x)[0]
            mask = y != IGNORE_INDEX
            hit = (logits.argmax(-1) == y) & mask
            correct_digits += int(hit.sum())
            labelled += int(mask.sum())
            exact[i : i + batch_size] = (hit.sum(1) == mask.sum(1)).cpu()
    finally:
        model.train(was_training)
    if labelled == 0:
        raise ValueError("data holds no labelled position; is it passkey data?")
    per_bin = []
    for b in range(depth_bins):
        sel = bins == b
        per_bin.append(float(exact[sel].float().mean()) if bool(sel.any()) else None)
    return {
        "accuracy": correct_digits / labelled,
        "exact_match": float(exact.float().mean()),
        "depth_exact_match": per_bin,
    }


def _read_counters(model: torch.nn.Module) -> list[dict[str, int]] | None:
    """Per-layer read counters of mixers that keep them (``stats`` + ``reset_stats``), else None."""
    found = []
    for block in getattr(model, "blocks", []):
        stats = getattr(block.mixer, "stats", None)
        if isinstance(stats, dict) and hasattr(block.mixer, "reset_stats"):
            found.append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    return found or None


def _reset_counters(model: torch.nn.Module) -> None:
    for block in getattr(model, "blocks", []):
        if hasattr(block.mixer, "reset_stats"):
            block.mixer.reset_stats()


@torch.no_grad()
def prefill_and_decode(
    model: LM, ids: torch.Tensor, *, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Prefill ``ids`` (1, L), measure the state, then decode greedily and time every step.

    Returns ``state_bytes`` (all layers, after the prefill), ``prefill_s``, per-token decode times
    ``decode_mean_s`` / ``decode_median_s`` over ``steps`` timed steps that follow ``warmup``
    untimed ones, and ``read_counters`` (per layer, summed over the timed steps) where mixers keep
    them. Each step feeds the previous step's argmax and carries the state forward, so chunked
    memories complete chunks and caches grow as in real generation.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, L) for a batch-1 prefill, got {tuple(ids.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    try:
        ids = ids.to(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits, states = model(ids)
        if cuda:
            torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - t0
        state_bytes = mixers.state_nbytes(states)
        nxt = logits[:, -1:].argmax(-1)
        for _ in range(warmup):
            logits, states = model(nxt, states=states)
            nxt = logits[:, -1:].argmax(-1)
        _reset_counters(model)
        times: list[float] = []
        if cuda:
            torch.cuda.synchronize(device)
            events = []
            for _ in range(steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                logits, states = model(nxt, states=states)
                nxt = logits[:, -1:].argmax(-1)
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) / 1e3 for s, e in events]
        else:
            for _ in range(steps):
                t = time.perf_counter()
                logits, states = model(nxt, states=states)
                nxt = logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t)
        counters = _read_counters(model)
    finally:
        model.train(was_training)
    return {
        "state_bytes": state_bytes,
        "prefill_s": prefill_s,
        "decode_mean_s": statistics.fmean(times),
        "decode_median_s": statistics.median(times),
        "decode_steps": steps,
        "read_counters": counters,
    }


def _is_oom(exc: BaseException) -> bool:
    """Device or host allocation failure (CUDA OOM, or the CPU allocator refusing a tensor)."""
    text = str(exc).lower()
    return (
        isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
    )


# -- the run kind -------------------------------------------------------------------------------
@register_job("passkey")
class PasskeyJob(MQARJob):
    """Train an LM of one mixer on passkey at the train lengths; accuracy, state, latency per test length."""

    def expand(self, table: dict[str, Any], *, where: str, overrides: Overrides) -> list[dict[str, Any]]:
        table = dict(table)
        measure = check_measure(table.pop("measure", {}), where)
        table.setdefault("task", "passkey")
        entries = table.get("mixers")
        test_options: dict[str, dict[str, Any]] = {}
        lm_layers: dict[str, int] = {}
        if isinstance(entries, list):
            stripped = []
            for i, entry in enumerate(entries):
                if isinstance(entry, dict) and ("test_options" in entry or "lm_layers" in entry):
                    entry = dict(entry)
                    label = str(entry.get("label", entry.get("name")))
                    opts = entry.pop("test_options", {})
                    if not isinstance(opts, dict):
                        raise ValueError(f"{where} mixers[{i}] test_options must be a table, got {opts!r}")
                    test_options[label] = opts
                    if "lm_layers" in entry:
                        n = entry.pop("lm_layers")
                        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                            raise ValueError(
                                f"{where} mixers[{i}] lm_layers must be a positive int, got {n!r}"
                            )
                        lm_layers[label] = n
                stripped.append(entry)
            table["mixers"] = stripped
        configs = super().expand(table, where=where, overrides=overrides)
        for config in configs:
            if config["label"] in lm_layers:
                config["n_layers"] = lm_layers[config["label"]]
            opts = test_options.get(config["label"], {})
            if opts:
                cls = mixers.MIXERS.get(config["mixer"])
                make_config(
                    cls.Config,
                    f"mixer {config['mixer']!r} test_options ({where} {config['label']})",
                    {"d_model": config["d_model"], **config["mixer_options"], **opts},
                )
            config["test_options"] = dict(opts)
            config["measure"] = dict(measure)
        return configs

    def run(self, config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        device = ctx.device
        measure = {**MEASURE_DEFAULTS, **config.get("measure", {})}
        train_sets = self._data(config, "train_sets")
        test_data = self._data(config, "test_sets")
        test_names = [set_name(s) for s in config["test_sets"]]
        test_tasks = [
            _build_task(config["task"], config["task_options"], s, "test_sets") for s in config["test_sets"]
        ]
        vocab = test_tasks[0].vocab_size

        def build(options: dict[str, Any]) -> LM:
            # mixer_options keeps a mixer option named like an LM argument (MemMamba's inner
            # n_layers) with the mixer.
            return LM.from_mixer(
                config["mixer"],
                vocab_size=vocab,
                d_model=config["d_model"],
                n_layers=config["n_layers"],
                short_conv=config.get("short_conv", 0),
                mixer_options=options,
            )

        seed_everything(config["seed"])  # the model's initial weights depend on the seed only
        model = build(config["mixer_options"])
        train_len = max(d.seq_len for d in train_sets)
        early = {n: d for n, d in zip(test_names, test_data, strict=True) if d.seq_len <= train_len}
        tc = TrainConfig(lr=config["lr"], seed=config["seed"], progress=ctx.progress, **config["train"])
        if tc.target_accuracy is not None and not early:
            raise ValueError(
                f"train.target_accuracy needs a test set no longer than the longest train set ({train_len})"
            )
        result = train(model, train_sets, early, tc, device)

        test_model = model
        if config.get("test_options"):
            test_model = build({**config["mixer_options"], **config["test_options"]})
            test_model.load_state_dict(model.state_dict(), strict=True)
            test_model.to(device)
        del model

        tests: list[dict[str, Any]] = []
        by_length: dict[int, dict[str, Any]] = {}
        for name, task, data in zip(test_names, test_tasks, test_data, strict=True):
            entry: dict[str, Any] = {"name": name, "seq_len": data.seq_len, "num_examples": len(data)}
            batch = max(1, measure["eval_tokens"] // data.seq_len)
            try:
                with peak_memory(device) as peak:
                    entry.update(
                        score_passkey(
                            test_model,
                            task,
                            data,
                            batch_size=batch,
                            depth_bins=measure["depth_bins"],
                            device=device,
                        )
                    )
                entry["eval_peak_memory_bytes"] = peak.bytes
            except Exception as exc:  # OOM at one length is a result; anything else fails the run
                if not _is_oom(exc):
                    raise
                entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                ctx.log(f"  {name}: {entry['error']}")
                _free(device)
            if data.seq_len not in by_length:
                try:
                    by_length[data.seq_len] = prefill_and_decode(
                        test_model,
                        data.inputs[:1],
                        steps=measure["decode_steps"],
                        warmup=measure["decode_warmup"],
                        device=device,
                    )
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    by_length[data.seq_len] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                    _free(device)
            entry["depth_bins"] = measure["depth_bins"]
            entry["key_len"] = task.config.key_len
            entry["filler"] = task.config.filler
            # The set's length may come from task_options rather than the set's own table.
            entry["train_length"] = data.seq_len <= train_len
            tests.append(entry)

        scored = [t for t in tests if "accuracy" in t]
        return {
            "accuracy": {t["name"]: t.get("accuracy") for t in tests},
            "exact_match": {t["name"]: t.get("exact_match") for t in tests},
            "mean_accuracy": statistics.fmean(t["accuracy"] for t in scored) if scored else 0.0,
            "mean_exact_match": statistics.fmean(t["exact_match"] for t in scored) if scored else 0.0,
            "failed_tests": [t["name"] for t in tests if "error" in t],
            "tests": tests,
            "state_bytes": {str(n): m.get("state_bytes") for n, m in by_length.items()},
            "decode_s_per_token": {str(n): m.get("decode_mean_s") for n, m in by_length.items()},
            "decode_median_s_per_token": {str(n): m.get("decode_median_s") for n, m in by_length.items()},
            "prefill_s": {str(n): m.get("prefill_s") for n, m in by_length.items()},
            "read_counters": {str(n): m.get("read_counters") for n, m in by_length.items()},
            "decode_errors": {str(n): m["error"] for n, m in by_length.items() if "error" in m},
            "train_max_len": train_len,
            "num_params": test_model.num_params(),
            **training_metrics(result, tc, t0),
        }

    # -- aggregation ------------------------------------------------------------------------
    def summary(self, records: list[RunRecord]) -> Table:
        best = best_lr_runs(records)
        return _best_table(best, title="Passkey: best learning rate per (mixer, d_model)", full=False)

    def report(self, records: list[RunRecord], out_dir: Path, prefix: str) -> list[ReportSection]:
        done = [r for r in records if r.status == "done"]
        n_failed = sum(r.status == "failed" for r in records)
        if not done:
            return [ReportSection(title="Passkey", text=f"No finished runs yet ({n_failed} failed).")]
        best = best_lr_runs(records)
        cfg = done[0].config
        train_mix = ", ".join(f"{set_name(s)} x{s['num_examples']}" for s in cfg["train_sets"])
        tests = ", ".join(f"{set_name(s)} x{s['num_examples']}" for s in cfg["test_sets"])
        opts = ", ".join(f"{k}={format_value(v)}" for k, v in cfg["task_options"].items()) or "defaults"
        text = (
            f"Task {cfg['task']} ({opts}); trained on {train_mix}; tested on {tests}; "
            f"{cfg['n_layers']}-layer LMs. {len(done)} runs finished, {n_failed} failed. For each "
            "(mixer, d_model, options) the learning rate with the best mean digit accuracy is kept. "
            "Exact match: every passkey digit right (what greedy decoding after the question returns). "
            "State bytes: all state tensors of all layers after a batch-1 prefill at the test length. "
            "Decode: seconds per generated token from that state, mean over the timed steps."
        )
        figures = [
            f for f in (_length_figure(best, out_dir, prefix), _depth_figure(best, out_dir, prefix)) if f
        ]
        return [
            ReportSection(
                title="Passkey retrieval vs length",
                text=text,
                tables=[
                    _best_table(best, title="Best learning rate per (mixer, d_model)", full=True),
                    _depth_table(best),
                    *([reads] if (reads := _reads_table(best)).rows else []),
                    _runs_table(done),
                ],
                figures=figures,
            )
        ]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- tables and plots ---------------------------------------------------------------------------
def _lengths(best: list[RunRecord]) -> list[int]:
    return sorted({int(n) for r in best for n in r.metrics["state_bytes"]})


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _key(r: RunRecord, several_d: bool) -> str:
    key = line_key(r.config)
    return f"{key} d={r.config['d_model']}" if several_d else key


def _best_table(best: list[RunRecord], *, title: str, full: bool) -> Table:
    test_names = list(dict.fromkeys(t["name"] for r in best for t in r.metrics["tests"]))
    lengths = _lengths(best)
    shown = lengths if full else lengths[-1:]
    columns = [
        "mixer",
        "d_model",
        "lr",
        *[f"exact {n}" for n in test_names],
        *[f"state @L{n}" for n in shown],
        *[f"decode @L{n}" for n in shown],
        "params",
        "tok/s",
    ]
    rows = []
    for r in best:
        m = r.metrics
        rows.append(
            [
                line_key(r.config),
                r.config["d_model"],
                r.config["lr"],
                *[_exact_cell(m, n) for n in test_names],
                *[format_bytes(m["state_bytes"].get(str(n))) for n in shown],
                *[_fmt_s(m["decode_s_per_token"].get(str(n))) for n in shown],
                m["num_params"],
                m["train_tokens_per_s"],
            ]
        )
    note = "exact: fraction of sequences answered exactly; 'oom': out of device memory at that length."
    return Table(title=title, columns=columns, rows=rows, note=note if full else "")


def _exact_cell(metrics: dict[str, Any], name: str) -> Any:
    if name in metrics.get("failed_tests", []):
        return "oom"
    return metrics["exact_match"].get(name)


def _depth_table(best: list[RunRecord]) -> Table:
    """Exact match per needle-depth bin at each test set (the needle-in-a-haystack heat map, as rows)."""
    rows = []
    n_bins = max((t.get("depth_bins", 0) for r in best for t in r.metrics["tests"]), default=0)
    for r in best:
        for t in r.metrics["tests"]:
            if "depth_exact_match" in t:
                rows.append([line_key(r.config), r.config["d_model"], t["name"], *t["depth_exact_match"]])
    edges = [f"depth {b / n_bins:.1f}-{(b + 1) / n_bins:.1f}" for b in range(n_bins)]
    return Table(
        title="Exact match by needle depth (0: start, 1: just before the question)",
        columns=["mixer", "d_model", "test", *edges],
        rows=rows,
    )


def _reads_table(best: list[RunRecord]) -> Table:
    """What a decoding step reads, for mixers that count it (Landmark): per query and head, summed
    over layers, against the number of cached tokens that full attention would read."""
    rows = []
    for r in best:
        for length, layers in sorted(r.metrics.get("read_counters", {}).items(), key=lambda kv: int(kv[0])):
            if not layers:
                continue
            per_query = {
                k: sum(layer.get(k, 0) / max(layer.get("queries", 1), 1) for layer in layers)
                for k in ("landmarks_scanned", "retrieved_tokens", "local_tokens")
            }
            rows.append(
                [
                    line_key(r.config),
                    r.config["d_model"],
                    int(length),
                    len(layers),
                    per_query["landmarks_scanned"],
                    per_query["retrieved_tokens"],
                    per_query["local_tokens"],
                    len(layers) * int(length),
                ]
            )
    return Table(
        title="Tokens read per decoding step (per query and head, summed over layers)",
        columns=[
            "mixer",
            "d_model",
            "prefill length",
            "layers",
            "landmarks",
            "retrieved",
            "local",
            "full attn",
        ],
        rows=rows,
    )


def _runs_table(done: list[RunRecord]) -> Table:
    rows = [
        [
            line_key(r.config),
            r.config["d_model"],
            r.config["lr"],
            r.metrics["mean_accuracy"],
            r.metrics["mean_exact_match"],
            r.metrics["final_loss"],
            r.metrics["epochs_run"],
            training_end(r.metrics),
            r.metrics["train_tokens_per_s"],
            format_bytes(r.metrics["peak_memory_bytes"]),
            r.metrics["wall_s"],
        ]
        for r in sorted(done, key=lambda r: (r.config["label"], r.config["d_model"], r.config["lr"]))
    ]
    return Table(
        title="Every finished run",
        columns=[
            "mixer",
            "d_model",
            "lr",
            "mean digit acc",
            "mean exact",
            "final loss",
            "epochs",
            "training ended",
            "tok/s",
            "peak mem",
            "wall s",
        ],
        rows=rows,
    )


def _length_figure(best: list[RunRecord], out_dir: Path, prefix: str) -> Figure | None:
    """Exact match vs test length (a panel per d_model), state bytes and decode latency vs length."""
    several_d = len({r.config["d_model"] for r in best}) > 1
    by_d: dict[int, list[RunRecord]] = defaultdict(list)
    for r in best:
        by_d[r.config["d_model"]].append(r)
    panels = []
    for d_model, runs in sorted(by_d.items()):
        series = []
        for r in runs:
            per_len: dict[int, list[float]] = defaultdict(list)
            for t in r.metrics["tests"]:
                if t.get("exact_match") is not None:
                    per_len[t["seq_len"]].append(t["exact_match"])
            xs = sorted(per_len)
            if xs:
                key = _key(r, several_d)
                series.append(Series(key=key, label=key, x=xs, y=[statistics.fmean(per_len[x]) for x in xs]))
        if series:
            train_len = max(r.metrics["train_max_len"] for r in runs)
            panels.append(
                Panel(
                    title=f"exact match, d_model {d_model} (trained up to {train_len})",
                    xlabel="test sequence length",
                    ylabel="exact match",
                    series=series,
                    xlog=True,
                    xbase=2,
                    ylim=(-0.02, 1.02),
                )
            )
    for metric, ylabel, scale in (
        ("state_bytes", "state bytes after prefill", 1.0),
        ("decode_s_per_token", "decode ms / token", 1e3),
    ):
        series = []
        for r in best:
            pts = sorted((int(n), v * scale) for n, v in r.metrics[metric].items() if v)
            if pts:
                key = _key(r, several_d)
                series.append(Series(key=key, label=key, x=[p[0] for p in pts], y=[p[1] for p in pts]))
        if series:
            panels.append(
                Panel(
                    title=ylabel,
                    xlabel="sequence length",
                    ylabel=ylabel,
                    series=series,
                    xlog=True,
                    xbase=2,
                    ylog=True,
                )
            )
    if not panels:
        return None
    path = f"{prefix}passkey_vs_length.png"
    save_panels(out_dir / path, panels, suptitle="Passkey: exact match, state and decode latency vs length")
    return Figure(
        path=path,
        title="passkey vs length",
        caption="Exact match at each test length (best lr), measured state bytes after a batch-1 prefill, "
        "and decode time per token from that state.",
    )


def _depth_figure(best: list[RunRecord], out_dir: Path, prefix: str) -> Figure | None:
    """Exact match vs needle depth, one panel per test length, a line per mixer."""
    several_d = len({r.config["d_model"] for r in best}) > 1
    names = list(dict.fromkeys(t["name"] for r in best for t in r.metrics["tests"]))
    panels = []
    for name in names:
        series = []
        for r in best:
            t = next((t for t in r.metrics["tests"] if t["name"] == name), None)
            if t is None or "depth_exact_match" not in t:
                continue
            n_bins = t["depth_bins"]
            pts = [((b + 0.5) / n_bins, v) for b, v in enumerate(t["depth_exact_match"]) if v is not None]
            if pts:
                key = _key(r, several_d)
                series.append(Series(key=key, label=key, x=[p[0] for p in pts], y=[p[1] for p in pts]))
        if series:
            panels.append(
                Panel(
                    title=f"test {name}",
                    xlabel="needle depth",
                    ylabel="exact match",
                    series=series,
                    ylim=(-0.02, 1.02),
                )
            )
    if not panels:
        return None
    path = f"{prefix}passkey_depth.png"
    save_panels(out_dir / path, panels, suptitle="Passkey exact match vs needle depth (best lr)")
    return Figure(
        path=path,
        title="passkey vs needle depth",
        caption="Exact match per needle-depth bin (bin centres; 0: the needle opens the sequence).",
    )
