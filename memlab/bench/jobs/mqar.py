"""Run kind ``mqar``: train a small LM built from one mixer on a task's train mix, test on each
test config, and measure the state the model carries at each test length.

The zoology / Based protocol: an LM of ``n_layers`` identical mixer layers learns from a mix of
train sets (different lengths and numbers of key-value pairs), then is scored on test sets drawn
from other seeds, some longer than any train set. The recall-memory frontier plots test accuracy
against the bytes of the state measured after a batch-1 prefill at the test length. For each
(mixer, d_model, other options) the report keeps the learning rate with the best mean test
accuracy, as zoology does.

Suite section (TOML)::

    [mqar]
    job = "mqar"
    seed = 0                  # int or list (an axis)
    n_layers = 2
    short_conv = 0            # kernel of the LM's short causal conv before each mixer (0: none)
    d_model = [64, 128]       # axis
    lr = [1e-3, 3e-3]         # axis
    task = "mqar"             # any registered task that makes TokenData
    task_options = { vocab_size = 8192, power_a = 0.01 }
    train = { epochs = 8, batch_size = 64 }          # TrainConfig fields except lr/seed
    train_sets = [ { seq_len = 64, num_pairs = 4, num_examples = 20000 } ]
    test_sets  = [ { seq_len = 64, num_pairs = 4, num_examples = 1000 } ]
    sweep = { task_options.vocab_size = [256, 8192] }  # axes: task_options.*, train.*, n_layers, short_conv
    [[mqar.mixers]]
    name = "based"            # a registered mixer
    label = "based"           # legend name (default: name); unique within the section
    options = { feature_dim = 16 }
    sweep = { window = [16, 32] }    # optional mixer-option axes
    d_model = [64]            # optional: replaces the section's d_model axis for this mixer
    lr = [1e-3]               # optional: replaces the section's lr axis
    train = { epochs = 4 }    # optional: TrainConfig fields over the section's (a slow mixer's budget)
    optional = true           # skip (with a note) when the mixer is not registered
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from memlab import mixers, tasks
from memlab.bench.jobs.base import (
    Job,
    Overrides,
    RunContext,
    as_axis,
    check_keys,
    flatten_axes,
    grid,
    register_job,
)
from memlab.bench.jobs.training_summary import training_end, training_metrics
from memlab.bench.measure import prefill_state_bytes
from memlab.bench.report import (
    Figure,
    Panel,
    ReportSection,
    Series,
    Table,
    format_bytes,
    format_value,
    pareto_front,
    save_panels,
)
from memlab.bench.store import RunRecord
from memlab.models.lm import LM
from memlab.registry import make_config
from memlab.tasks import TokenData
from memlab.train import TrainConfig, seed_everything, train

SECTION_KEYS = {
    "job",
    "seed",
    "n_layers",
    "short_conv",
    "d_model",
    "lr",
    "task",
    "task_options",
    "train",
    "train_sets",
    "test_sets",
    "sweep",
    "mixers",
}
MIXER_KEYS = {"name", "label", "options", "sweep", "d_model", "lr", "train", "optional"}
# The runner owns these TrainConfig fields: lr and seed are grid axes, progress follows the CLI,
# and benchmark runs keep no checkpoints.
_TRAIN_RESERVED = {"lr", "seed", "progress", "checkpoint"}
_ABBREV = {"seq_len": "L", "num_pairs": "kv"}


def set_name(options: dict[str, Any]) -> str:
    """A short name for a data set: ``{seq_len: 64, num_pairs: 4, ...} -> 'L64 kv4'``."""
    if "name" in options:
        return str(options["name"])
    # Fixed order (length first) so the name does not depend on how the TOML or JSON ordered keys.
    keys = sorted(
        (k for k in options if k != "num_examples"), key=lambda k: (k not in _ABBREV, k != "seq_len", k)
    )
    parts = [f"{_ABBREV.get(k, k + '=')}{options[k]}" for k in keys]
    return " ".join(parts) or "default"


_MAX_SETS = 1000  # train or test sets per section: each suite seed owns 1000 data seeds of each kind


def _data_seed(seed: int, index: int, test: bool) -> int:
    # Train sets get even seeds, test sets odd ones: they never share a generator stream, and
    # every run with the same suite seed sees the same data (a fair comparison across lrs).
    return 2 * (_MAX_SETS * seed + index) + int(test)


@register_job("mqar")
class MQARJob(Job):
    """Train an ``LM.from_mixer`` on the train mix; accuracy and state bytes per test config."""

    def __init__(self) -> None:
        self._notes: list[str] = []
        # The last data drawn, keyed by its full description: consecutive runs of a suite share
        # their data, and MQAR sets of 10^5 sequences are worth not drawing twice.
        self._data_cache: dict[str, list[TokenData]] = {}

    def notes(self) -> list[str]:
        return list(self._notes)

    # -- expansion --------------------------------------------------------------------------
    def expand(self, table: dict[str, Any], *, where: str, overrides: Overrides) -> list[dict[str, Any]]:
        self._notes = []
        check_keys(
            table, SECTION_KEYS, where, required={"d_model", "lr", "train_sets", "test_sets", "mixers"}
        )
        task = table.get("task", "mqar")
        if not isinstance(task, str) or task not in tasks.TASKS:
            # The registry's message names the known tasks; the section is named too, as for mixers.
            raise ValueError(f"{where}: unknown task {task!r}; expected one of {tasks.names()}")
        task_options = table.get("task_options", {})
        task_fields = {f.name for f in dataclasses.fields(tasks.TASKS.get(task).Config)}
        check_keys(task_options, task_fields, f"{where} task_options")
        train_opts = dict(table.get("train", {}))
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - _TRAIN_RESERVED
        check_keys(train_opts, train_fields, f"{where} train")
        train_sets = self._sets(table["train_sets"], f"{where} train_sets", overrides)
        test_sets = self._sets(table["test_sets"], f"{where} test_sets", overrides)
        for kind, sets in (("train_sets", train_sets), ("test_sets", test_sets)):
            if len(sets) > _MAX_SETS:  # their data seeds would run into the next suite seed's
                raise ValueError(f"{where} {kind}: {len(sets)} sets, at most {_MAX_SETS} are allowed")
        names = [set_name(s) for s in test_sets]
        if len(set(names)) != len(names):
            raise ValueError(
                f"{where} test_sets have duplicate names {names}; give them distinct 'name' keys"
            )

        section_axes = {"seed": as_axis(table.get("seed", 0), f"{where} seed")}
        section_axes.update(flatten_axes(table.get("sweep", {}), f"{where} sweep"))
        for path in section_axes:
            head = path.split(".")[0]
            if path != "seed" and head not in ("task_options", "train", "n_layers", "short_conv"):
                raise ValueError(
                    f"{where} sweep axis {path!r} must start with task_options. or train., "
                    "or be n_layers or short_conv"
                )
            if head == "train" and path.split(".", 1)[1] in _TRAIN_RESERVED:
                raise ValueError(f"{where} sweep axis {path!r}: lr and seed are axes of their own")
        d_models = as_axis(table["d_model"], f"{where} d_model")
        lrs = as_axis(table["lr"], f"{where} lr")

        entries = table["mixers"]
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where} mixers must be a non-empty list of tables, got {entries!r}")
        labels: set[str] = set()
        configs: list[dict[str, Any]] = []
        for i, entry in enumerate(entries):
            ewhere = f"{where} mixers[{i}]"
            check_keys(entry, MIXER_KEYS, ewhere, required={"name"})
            name = entry["name"]
            if name not in mixers.MIXERS:
                if entry.get("optional", False):
                    self._notes.append(f"{where}: skipped mixer {name!r} (not registered)")
                    continue
                raise ValueError(
                    f"{ewhere}: unknown mixer {name!r}; expected one of {mixers.names()} "
                    "(or set optional = true to skip it when absent)"
                )
            label = entry.get("label", name)
            if label in labels:
                raise ValueError(f"{ewhere}: label {label!r} is used twice in the section; give each a label")
            labels.add(label)
            options = entry.get("options", {})
            if not isinstance(options, dict):
                raise ValueError(f"{ewhere} options must be a table, got {options!r}")
            mixer_axes = flatten_axes(entry.get("sweep", {}), f"{ewhere} sweep")
            e_dm = as_axis(entry.get("d_model", d_models), f"{ewhere} d_model")
            e_lr = as_axis(entry.get("lr", lrs), f"{ewhere} lr")
            e_train = entry.get("train", {})
            check_keys(e_train, train_fields, f"{ewhere} train")
            e_train = {**train_opts, **e_train}
            if overrides.epochs is not None:
                e_train["epochs"] = overrides.epochs
            for d_model in e_dm:
                for m_combo in grid(mixer_axes):
                    mixer_options = {**options, **m_combo}
                    cls = mixers.MIXERS.get(name)
                    make_config(
                        cls.Config, f"mixer {name!r} ({ewhere})", {"d_model": d_model, **mixer_options}
                    )
                    for s_combo in grid(section_axes):
                        for lr in e_lr:
                            configs.append(
                                self._config(
                                    label=label,
                                    mixer=name,
                                    mixer_options=mixer_options,
                                    d_model=d_model,
                                    lr=lr,
                                    task=task,
                                    task_options=task_options,
                                    train_opts=e_train,
                                    train_sets=train_sets,
                                    test_sets=test_sets,
                                    table=table,
                                    axes={**{f"mixer.{k}": v for k, v in m_combo.items()}, **s_combo},
                                    where=ewhere,
                                )
                            )
        return configs

    def _sets(self, value: Any, where: str, overrides: Overrides) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where} must be a non-empty list of tables, got {value!r}")
        out = []
        for j, s in enumerate(value):
            if not isinstance(s, dict) or "num_examples" not in s:
                raise ValueError(f"{where}[{j}] must be a table with num_examples, got {s!r}")
            n = s["num_examples"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{where}[{j}].num_examples must be a positive int, got {n!r}")
            s = dict(s)
            if overrides.max_examples is not None:
                s["num_examples"] = min(n, overrides.max_examples)
            out.append(s)
        return out

    def _config(
        self,
        *,
        label: str,
        mixer: str,
        mixer_options: dict[str, Any],
        d_model: int,
        lr: Any,
        task: str,
        task_options: dict[str, Any],
        train_opts: dict[str, Any],
        train_sets: list[dict[str, Any]],
        test_sets: list[dict[str, Any]],
        table: dict[str, Any],
        axes: dict[str, Any],
        where: str,
    ) -> dict[str, Any]:
        seed = axes.get("seed", 0)
        t_opts = dict(task_options)
        tr_opts = dict(train_opts)
        n_layers = table.get("n_layers", 2)
        short_conv = table.get("short_conv", 0)
        for path, value in axes.items():
            head, _, rest = path.partition(".")
            if head == "task_options":
                t_opts[rest] = value
            elif head == "train":
                tr_opts[rest] = value
            elif head == "n_layers":
                n_layers = value
            elif head == "short_conv":
                short_conv = value
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"{where}: n_layers must be a positive int, got {n_layers!r}")
        if isinstance(short_conv, bool) or not isinstance(short_conv, int) or short_conv < 0:
            raise ValueError(f"{where}: short_conv must be an int >= 0 (0: none), got {short_conv!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ValueError(f"{where}: lr must be a number, got {lr!r}")
        # Validate now so a typo fails before the first run, not hours into a sweep.
        TrainConfig(lr=float(lr), seed=seed, **tr_opts)
        vocab = set()
        for kind, sets in (("train_sets", train_sets), ("test_sets", test_sets)):
            for j, s in enumerate(sets):
                vocab.add(_build_task(task, t_opts, s, f"{where} {kind}[{j}]").vocab_size)
        if len(vocab) != 1:
            raise ValueError(
                f"{where}: every train and test set must share one vocab_size, got {sorted(vocab)}"
            )
        return {
            "label": label,
            "mixer": mixer,
            "mixer_options": mixer_options,
            "d_model": d_model,
            "n_layers": n_layers,
            # Only when used, so the ids of runs without the conv stay what they were.
            **({"short_conv": short_conv} if short_conv else {}),
            "lr": float(lr),
            "seed": seed,
            "task": task,
            "task_options": t_opts,
            "train": tr_opts,
            "train_sets": train_sets,
            "test_sets": test_sets,
            "axes": {k: v for k, v in axes.items() if k != "seed"},
        }

    def headline(self, metrics: dict[str, Any]) -> str:
        longest = max(metrics["state_bytes"], key=int)
        return (
            f"mean acc {metrics['mean_accuracy']:.3f}, state @L{longest} "
            f"{format_bytes(metrics['state_bytes'][longest])}, {metrics['train_tokens_per_s']:,.0f} tok/s"
        )

    def describe(self, config: dict[str, Any]) -> str:
        extra = "".join(f" {k.split('.')[-1]}={format_value(v)}" for k, v in config["axes"].items())
        seed = f" seed={config['seed']}" if config["seed"] else ""
        return f"{config['label']} d={config['d_model']} lr={config['lr']:g}{extra}{seed}"

    # -- running ----------------------------------------------------------------------------
    def _data(self, config: dict[str, Any], kind: str) -> list[TokenData]:
        key = json.dumps(
            [config["task"], config["task_options"], config[kind], config["seed"]], sort_keys=True
        )
        cache_key = f"{kind}:{key}"
        if cache_key not in self._data_cache:
            for k in [k for k in self._data_cache if k.startswith(f"{kind}:")]:
                del self._data_cache[k]
            test = kind == "test_sets"
            data = []
            for j, s in enumerate(config[kind]):
                task = _build_task(config["task"], config["task_options"], s, kind)
                data.append(task.make(s["num_examples"], seed=_data_seed(config["seed"], j, test)))
            self._data_cache[cache_key] = data
        return self._data_cache[cache_key]

    def run(self, config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        train_sets = self._data(config, "train_sets")
        test_data = self._data(config, "test_sets")
        test_names = [set_name(s) for s in config["test_sets"]]
        vocab = _build_task(
            config["task"], config["task_options"], config["test_sets"][0], "test_sets"
        ).vocab_size
        seed_everything(config["seed"])  # the model's initial weights depend on the seed only
        model = LM.from_mixer(
            config["mixer"],
            vocab_size=vocab,
            d_model=config["d_model"],
            n_layers=config["n_layers"],
            short_conv=config.get("short_conv", 0),
            mixer_options=config["mixer_options"],
        )
        tc = TrainConfig(lr=config["lr"], seed=config["seed"], progress=ctx.progress, **config["train"])
        result = train(model, train_sets, dict(zip(test_names, test_data, strict=True)), tc, ctx.device)

        state_bytes: dict[str, int] = {}
        for data in test_data:
            length = data.seq_len
            if str(length) not in state_bytes:
                ids = data.inputs[:1].to(ctx.device)
                state_bytes[str(length)] = prefill_state_bytes(model, ids)
        tests = []
        for name, s, data in zip(test_names, config["test_sets"], test_data, strict=True):
            tests.append(
                {
                    "name": name,
                    "seq_len": data.seq_len,
                    "num_pairs": s.get("num_pairs"),
                    "num_examples": len(data),
                    "accuracy": result.eval_accuracy[name],
                    "best_accuracy": result.best_accuracy[name],
                    "state_bytes": state_bytes[str(data.seq_len)],
                }
            )
        accs = [t["accuracy"] for t in tests]
        return {
            "accuracy": {t["name"]: t["accuracy"] for t in tests},
            "mean_accuracy": sum(accs) / len(accs),
            "tests": tests,
            "state_bytes": state_bytes,
            "num_params": model.num_params(),
            **training_metrics(result, tc, t0),
        }

    # -- aggregation ------------------------------------------------------------------------
    def summary(self, records: list[RunRecord]) -> Table:
        best = best_lr_runs(records)
        return _best_table(best, title="MQAR: best learning rate per (mixer, d_model)", state_columns="last")

    def report(self, records: list[RunRecord], out_dir: Path, prefix: str) -> list[ReportSection]:
        done = [r for r in records if r.status == "done"]
        n_failed = sum(r.status == "failed" for r in records)
        if not done:
            return [ReportSection(title="MQAR", text=f"No finished runs yet ({n_failed} failed).")]
        best = best_lr_runs(records)
        cfg = done[0].config
        epochs = sorted({r.config["train"].get("epochs", TrainConfig.epochs) for r in done})
        train_mix = ", ".join(f"{set_name(s)} x{s['num_examples']}" for s in cfg["train_sets"])
        text = (
            f"Task {cfg['task']} with {_fmt_opts(cfg['task_options'])}; {len(cfg['train_sets'])} train sets "
            f"({train_mix}), "
            f"{len(cfg['test_sets'])} test sets; {cfg['n_layers']}-layer LMs, epochs {epochs}. "
            f"{len(done)} runs finished, {n_failed} failed. For each (mixer, d_model, options) the learning "
            "rate with the best mean test accuracy is kept (zoology style). State bytes are measured from "
            "the state tensors of every layer after a batch-1 prefill at the test length."
        )
        figures = [
            _frontier_figure(best, out_dir, prefix),
            _length_figure(best, out_dir, prefix),
            _throughput_figure(done, out_dir, prefix),
        ]
        all_rows = [
            [
                r.config["label"],
                r.config["d_model"],
                _fmt_options(r.config),
                r.config["lr"],
                _acc(r.metrics["mean_accuracy"]),
                r.metrics["final_loss"],
                r.metrics["epochs_run"],
                training_end(r.metrics),
                _rate(r.metrics["train_tokens_per_s"]),
                r.metrics["wall_s"],
            ]
            for r in sorted(done, key=lambda r: (r.config["label"], r.config["d_model"], r.config["lr"]))
        ]
        all_table = Table(
            title="Every finished run",
            columns=[
                "mixer",
                "d_model",
                "options",
                "lr",
                "mean acc",
                "final loss",
                "epochs",
                "training ended",
                "tok/s",
                "wall s",
            ],
            rows=all_rows,
        )
        return [
            ReportSection(
                title="MQAR recall vs state",
                text=text,
                tables=[
                    _best_table(best, title="Best learning rate per (mixer, d_model)", state_columns="all"),
                    all_table,
                ],
                figures=[f for f in figures if f is not None],
            )
        ]


def _build_task(task: str, task_options: dict[str, Any], data_set: dict[str, Any], where: str) -> tasks.Task:
    """The task of one data set: shared options overridden by the set's own (minus its size/name)."""
    options = {**task_options, **{k: v for k, v in data_set.items() if k not in ("num_examples", "name")}}
    try:
        return tasks.build(task, **options)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_opts(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in options.items()) or "defaults"


def _fmt_options(config: dict[str, Any]) -> str:
    """Everything that tells two runs of one label apart in a table: the mixer's options as the
    suite gave them, swept section options, and the LM's short conv."""
    parts = [f"{k}={format_value(v)}" for k, v in config["mixer_options"].items()]
    parts += [
        f"{k.split('.')[-1]}={format_value(v)}"
        for k, v in config["axes"].items()
        if not k.startswith("mixer.")
    ]
    if config.get("short_conv"):
        parts.append(f"short_conv={config['short_conv']}")
    return " ".join(parts) or "-"


def _fmt_axes(config: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in config["axes"].items()) or "-"


def line_key(config: dict[str, Any], *, mixer_axes: bool = True) -> str:
    """The curve a run belongs to: its label plus its swept options (other than d_model and lr).

    ``mixer_axes=False`` leaves out swept mixer options: the frontier draws one line per mixer
    across d_model and its options, as zoology does.
    """
    axes = " ".join(
        f"{k.split('.')[-1]}={format_value(v)}"
        for k, v in config["axes"].items()
        if mixer_axes or not k.startswith("mixer.")
    )
    return f"{config['label']} {axes}" if axes else config["label"]


def best_lr_runs(records: list[RunRecord]) -> list[RunRecord]:
    """Per (label, d_model, options, seed, data): the finished run with the best mean accuracy."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status != "done":
            continue
        key = json.dumps({k: v for k, v in r.config.items() if k != "lr"}, sort_keys=True)
        groups[key].append(r)
    best = [max(g, key=lambda r: (r.metrics["mean_accuracy"], -r.config["lr"])) for g in groups.values()]
    return sorted(best, key=lambda r: (r.config["label"], r.config["d_model"], _fmt_axes(r.config)))


def _best_table(best: list[RunRecord], *, title: str, state_columns: str) -> Table:
    test_names = list(dict.fromkeys(t["name"] for r in best for t in r.metrics["tests"]))
    lengths = sorted({int(k) for r in best for k in r.metrics["state_bytes"]})
    shown = lengths if state_columns == "all" else lengths[-1:]
    columns = [
        "mixer",
        "d_model",
        "options",
        "lr",
        "mean acc",
        *test_names,
        *[f"state @L{n}" for n in shown],
        "params",
        "tok/s",
        "peak mem",
    ]
    rows = []
    for r in best:
        m = r.metrics
        rows.append(
            [
                r.config["label"],
                r.config["d_model"],
                _fmt_options(r.config),
                r.config["lr"],
                _acc(m["mean_accuracy"]),
                *[_acc(m["accuracy"].get(n)) for n in test_names],
                *[format_bytes(m["state_bytes"].get(str(n))) for n in shown],
                m["num_params"],
                _rate(m["train_tokens_per_s"]),
                format_bytes(m["peak_memory_bytes"]),
            ]
        )
    note = ""
    if any(r.device and r.device.startswith("cpu") for r in best):
        note = (
            "peak mem on CPU is the process RSS high-water mark, which only grows over a suite; "
            "on CUDA it is torch.cuda.max_memory_allocated during the run."
        )
    return Table(title=title, columns=columns, rows=rows, note=note)


def _frontier_figure(best: list[RunRecord], out_dir: Path, prefix: str) -> Figure | None:
    """One panel per test config: accuracy vs state bytes at its length, a line per mixer."""
    tests = list(dict.fromkeys((t["name"], t["seq_len"]) for r in best for t in r.metrics["tests"]))
    panels = []
    for name, length in tests:
        points: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in best:
            acc = r.metrics["accuracy"].get(name)
            sb = r.metrics["state_bytes"].get(str(length))
            if acc is not None and sb:
                points[line_key(r.config, mixer_axes=False)].append((float(sb), acc))
        series = []
        for key, pts in sorted(points.items()):
            front = pareto_front(pts)
            series.append(Series(key=key, x=[p[0] for p in front], y=[p[1] for p in front], label=key))
            if len(front) < len(pts):
                series.append(Series(key=key, x=[p[0] for p in pts], y=[p[1] for p in pts], line=False))
        panels.append(
            Panel(
                title=f"test {name}",
                xlabel="state bytes after prefill (log)",
                ylabel="accuracy",
                series=series,
                xlog=True,
                ylim=(-0.02, 1.02),
            )
        )
    if not panels:
        return None
    path = f"{prefix}frontier.png"
    save_panels(out_dir / path, panels, suptitle="MQAR accuracy vs measured state bytes (best lr)")
    return Figure(
        path=path,
        title="recall-memory frontier",
        caption="Accuracy vs state bytes measured at each test length; line: the Pareto front of "
        "each mixer over d_model and options, faint markers: dominated points.",
    )


def _length_figure(best: list[RunRecord], out_dir: Path, prefix: str) -> Figure | None:
    """One panel per d_model: mean accuracy at each test length, a line per mixer."""
    by_d: dict[int, list[RunRecord]] = defaultdict(list)
    for r in best:
        by_d[r.config["d_model"]].append(r)
    panels = []
    for d_model, runs in sorted(by_d.items()):
        series = []
        for r in runs:
            per_len: dict[int, list[float]] = defaultdict(list)
            for t in r.metrics["tests"]:
                per_len[t["seq_len"]].append(t["accuracy"])
            xs = sorted(per_len)
            series.append(
                Series(
                    key=line_key(r.config),
                    label=line_key(r.config),
                    x=xs,
                    y=[statistics.fmean(per_len[x]) for x in xs],
                )
            )
        panels.append(
            Panel(
                title=f"d_model {d_model}",
                xlabel="test sequence length",
                ylabel="mean accuracy",
                series=series,
                xlog=True,
                xbase=2,
                ylim=(-0.02, 1.02),
            )
        )
    if not panels:
        return None
    path = f"{prefix}accuracy_vs_length.png"
    save_panels(out_dir / path, panels, suptitle="MQAR accuracy vs sequence length (best lr)")
    return Figure(
        path=path,
        title="accuracy vs sequence length",
        caption="Mean accuracy over the test configs of each length.",
    )


def _throughput_figure(done: list[RunRecord], out_dir: Path, prefix: str) -> Figure | None:
    """Training tokens/s per mixer (median over learning rates), one bar per d_model."""
    per: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in done:
        per[r.config["d_model"]][line_key(r.config)].append(r.metrics["train_tokens_per_s"])
    if not per:
        return None
    keys = sorted({k for v in per.values() for k in v})
    series = [
        Series(
            key=f"d_model {d}",
            label=f"d_model {d}",
            x=[k for k in keys if k in v],
            y=[statistics.median(v[k]) for k in keys if k in v],
        )
        for d, v in sorted(per.items())
    ]
    path = f"{prefix}throughput.png"
    device = sorted({str((r.env or {}).get("device_name")) for r in done})
    panel = Panel(
        title="training throughput",
        xlabel="",
        ylabel="training tokens / s",
        series=series,
        ylog=True,
        bars=True,
    )
    save_panels(out_dir / path, [panel], ncols=1)
    return Figure(
        path=path,
        title="training throughput",
        caption=f"Training tokens per second (median over learning rates) on {', '.join(device)}.",
    )
