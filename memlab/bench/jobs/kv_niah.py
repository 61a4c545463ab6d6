"""Run kind ``kv_niah``: KV-cache policies on a pretrained LM's needle prompts.

One run = one (variant, haystack, length, mode) cell; inside it every policy and budget answers
the same prompts, so their numbers compare on identical work. For each policy and budget the run
records exact match of the greedy answer (``max_new_tokens`` >= 24), the teacher-forced
log-likelihood of the answer, the KV bytes held after the prompt against the full cache, and the
share of rows decoding read. ``mode`` is ``agnostic`` (the context is compressed before the
question arrives) or ``aware`` (the question is in the compressed prefill); reports say which.

Policies that only decide what to keep after attending (snapkv, pyramidkv, h2o, streaming, cake,
alisa, delta, full) share one observed full prefill per prompt (``KVCache.fork``), which is
exact for one-shot prefill and saves CPU time; DuoAttention and GemFilter change the prefill
itself and run their own.

Suite section (TOML)::

    [kv]
    job = "kv_niah"
    model = "smollm2-135m"        # packaged name or local checkpoint folder
    variant = "single"            # axis: passkey, single, multikey, multivalue
    haystack = "synthetic"        # axis: synthetic, real
    length = [1024]               # axis: prompt tokens
    mode = ["agnostic"]           # axis: agnostic, aware
    samples = 3
    seed = 0
    max_new_tokens = 24
    dtype = "float32"
    policies = [
      { name = "full" },
      { name = "snapkv", ratio = [0.5, 0.25, 0.1] },
      { name = "duo", ratio = [0.5], options = { gates = "auto" } },   # gates beside the model
    ]
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memlab.bench.jobs.base import Job, Overrides, RunContext, as_axis, check_keys, grid, register_job
from memlab.bench.measure import release_host_memory
from memlab.bench.report import Figure, Panel, ReportSection, Series, Table, format_value, save_panels
from memlab.bench.store import RunRecord
from memlab.kvcache import KVCache, greedy, policies, prefill, run_prompt, teacher_force
from memlab.tasks.niah import HAYSTACKS, VARIANTS, Niah, NiahConfig, NiahSample, exact_match

SECTION_KEYS = {
    "job",
    "model",
    "variant",
    "haystack",
    "length",
    "mode",
    "samples",
    "seed",
    "max_new_tokens",
    "dtype",
    "policies",
    "share_prefill",
    "loglik",
    "prefill_chunk",
    "batch_size",
}
MODES = ("agnostic", "aware")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NOT_FORKABLE = {"duo", "gemfilter"}


def policy_specs(entries: Any, where: str) -> list[dict[str, Any]]:
    """Suite policy entries -> one spec per (policy, budget): {label, name, budget, options}."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where} policies must be a non-empty list of tables, got {entries!r}")
    specs = []
    for i, entry in enumerate(entries):
        check_keys(entry, {"name", "ratio", "tokens", "options", "label"}, f"{where} policies[{i}]", {"name"})
        name = entry["name"]
        policies.POLICIES.get(name)  # unknown names fail here
        options = dict(entry.get("options", {}))
        budgets: list[dict[str, Any]] = []
        for key in ("ratio", "tokens"):
            if key in entry:
                budgets += [{key: v} for v in as_axis(entry[key], f"{where} policies[{i}].{key}")]
        for budget in budgets or [{}]:
            label = entry.get("label", name)
            specs.append({"label": label, "name": name, "budget": budget, "options": options})
            # Build once with placeholder gates so that bad options fail before anything runs.
            probe = dict(options)
            if name == "duo" and probe.get("gates") == "auto":
                probe["gates"] = torch.ones(1, 1)
            policies.build(name, **budget, **probe)
    return specs


def spec_key(spec: dict[str, Any]) -> str:
    budget = spec["budget"]
    if not budget:
        return spec["label"]
    ((k, v),) = budget.items()
    return f"{spec['label']}@{format_value(v)}" if k == "ratio" else f"{spec['label']}@{v}tok"


def build_policy(spec: dict[str, Any], model_name: str, mode: str) -> policies.Policy:
    options = dict(spec["options"])
    if spec["name"] == "duo" and options.get("gates", "auto") == "auto":
        from memlab.kvcache.calibrate import gates_path

        options["gates"] = str(gates_path(model_name))
    return policies.build(spec["name"], **spec["budget"], query_aware=(mode == "aware"), **options)


def evaluate(
    model: Any,
    tokenizer: Any,
    samples: list[NiahSample],
    specs: list[dict[str, Any]],
    *,
    model_name: str,
    mode: str,
    max_new_tokens: int = 24,
    share_prefill: bool = True,
    loglik: bool = True,
    prefill_chunk: int | None = None,
    batch_size: int = 1,
    log: Any = None,
    on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every spec on every sample. Returns one row per (sample, spec).

    Samples run in batches of up to ``batch_size`` that share question and answer lengths
    (contexts are left-padded), so a batch is exactly the samples run alone. ``on_progress``
    gets the rows so far after each (batch, spec): a long evaluation killed midway keeps them.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    built = []
    for spec in specs:
        try:
            built.append((spec, build_policy(spec, model_name, mode)))
        except ValueError as exc:  # e.g. DuoAttention without calibrated gates
            built.append((spec, exc))
    forkable = [p for _, p in built if isinstance(p, policies.Policy) and p.name not in NOT_FORKABLE]
    share = share_prefill and prefill_chunk is None and bool(forkable)
    window = max([p.query_window() for p in forkable] + [0])
    mass = any(p.needs_mass for p in forkable)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(len(s.question_ids), len(s.answer_ids))].append(i)
    batches = [idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]
    rows: list[dict[str, Any]] = []
    for batch in batches:
        bs = [samples[i] for i in batch]
        tc = max(len(s.context_ids) for s in bs)
        ctx = torch.full((len(bs), tc), pad, dtype=torch.long)
        mask = torch.zeros(len(bs), tc, dtype=torch.long)
        for r, s in enumerate(bs):
            ctx[r, tc - len(s.context_ids) :] = s.context_ids
            mask[r, tc - len(s.context_ids) :] = 1
        ctx, mask = ctx.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        question = torch.stack([s.question_ids for s in bs]).to(device)
        answer = torch.stack([s.answer_ids for s in bs]).to(device)
        prompt_tokens = mask.sum(dim=1) + question.shape[1]  # (B,) real prompt tokens
        base = base_logits = None
        t_base = 0.0
        if share:
            t0 = time.perf_counter()
            observe = policies.build("full", observe_window=window, observe_mass=mass)
            base = KVCache(model.config, policy=observe)
            if mode == "agnostic":
                base_logits = prefill(model, ctx, base, attention_mask=mask if padded else None)
            else:
                ids = torch.cat([ctx, question], dim=1)
                full_mask = torch.cat([mask, torch.ones_like(question)], dim=1)
                base_logits = prefill(model, ids, base, attention_mask=full_mask if padded else None)
            t_base = time.perf_counter() - t0

        def prompt(policy: policies.Policy, ctx=ctx, mask=mask, question=question, base=base,
                   logits0=base_logits, padded=padded):
            shared = base if share else None
            return _prompt(model, policy, mode, ctx, mask if padded else None, question, shared, logits0,
                           prefill_chunk)

        for spec, policy in built:
            heads = [{"sample": samples_index, "key": spec_key(spec), "label": spec["label"],
                      "policy": spec["name"], **spec["budget"], "mode": mode} for samples_index in batch]
            if isinstance(policy, ValueError):
                for h in heads:
                    h["error"] = str(policy)
                rows.extend(heads)
                continue
            t0 = time.perf_counter()
            cache, logits = prompt(policy)
            prompt_s = time.perf_counter() - t0 + (t_base if share else 0.0)
            kept = cache.kept_tokens().sum(dim=(0, 2)).double()  # (B,) rows over layers and heads
            full_rows = (prompt_tokens.cpu().double() * cache.n_layers * cache.n_kv_heads)
            t0 = time.perf_counter()
            out = greedy(model, cache, logits, max_new_tokens=max_new_tokens, eos_token_id=eos)
            decode_s = time.perf_counter() - t0
            ll = None
            if loglik:
                cache2, logits2 = prompt(policy)
                ll = teacher_force(model, cache2, logits2, answer).tolist()
            for r, (h, s) in enumerate(zip(heads, bs, strict=True)):
                text = tokenizer.decode(out[r], skip_special_tokens=True)
                h.update(
                    answer=text.strip()[:80],
                    em=float(exact_match(text, s)),
                    kv_fraction=float(kept[r] / full_rows[r]),
                    kv_bytes_batch=cache.nbytes(),
                    attended_ratio=cache.attended_ratio(),
                    prompt_s=prompt_s / len(bs),
                    decode_s=decode_s / len(bs),
                )
                if ll is not None:
                    h["loglik"] = float(ll[r])
                if log is not None:
                    log(f"  sample {h['sample']} {h['key']}: em={h['em']:.0f} kv={h['kv_fraction']:.2f} "
                        f"{h['answer']!r}")
            rows.extend(heads)
            if on_progress is not None:
                on_progress(rows)
        if device.type == "cpu":
            release_host_memory()
    return rows


def _prompt(
    model: Any,
    policy: policies.Policy,
    mode: str,
    ctx: torch.Tensor,
    mask: torch.Tensor | None,
    question: torch.Tensor,
    base: KVCache | None,
    base_logits: torch.Tensor | None,
    prefill_chunk: int | None,
) -> tuple[KVCache, torch.Tensor]:
    """The prompt under ``policy``: forked from the shared prefill when possible. Frozen cache and
    the last prompt logits (B, V)."""
    if base is not None and policy.name not in NOT_FORKABLE:
        cache = base.fork(policy)
        cache.freeze()
        if mode == "agnostic":
            return cache, prefill(model, question, cache)
        return cache, base_logits
    cache = KVCache(model.config, policy=policy, prefill_chunk=prefill_chunk)
    return cache, run_prompt(model, ctx, cache, attention_mask=mask, question_ids=question)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean metrics per spec key (errors kept as text)."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["key"]].append(r)
    out = {}
    for key, rs in by.items():
        ok = [r for r in rs if "error" not in r]
        entry: dict[str, Any] = {"policy": rs[0]["policy"], "label": rs[0]["label"], "n": len(ok)}
        for b in ("ratio", "tokens"):
            if b in rs[0]:
                entry[b] = rs[0][b]
        if not ok:
            entry["error"] = rs[0].get("error", "")
        for m in ("em", "loglik", "kv_fraction", "attended_ratio", "prompt_s", "decode_s"):
            vals = [r[m] for r in ok if m in r]
            if vals:
                entry[m] = statistics.fmean(vals)
        if ok and "em" in ok[0]:
            n = len(ok)
            p = entry["em"]
            entry["em_se"] = math.sqrt(max(p * (1 - p), 0.0) / n) if n > 1 else 0.0
        out[key] = entry
    return out


@register_job("kv_niah")
class KVNiahJob(Job):
    """KV policies x budgets on niah prompts of one pretrained model."""

    def expand(self, table: dict[str, Any], *, where: str, overrides: Overrides) -> list[dict[str, Any]]:
        check_keys(table, SECTION_KEYS, where, {"policies"})
        specs = policy_specs(table["policies"], where)
        axes = {
            "variant": as_axis(table.get("variant", "single"), f"{where} variant"),
            "haystack": as_axis(table.get("haystack", "synthetic"), f"{where} haystack"),
            "length": as_axis(table.get("length", 1024), f"{where} length"),
            "mode": as_axis(table.get("mode", "agnostic"), f"{where} mode"),
        }
        for v in axes["variant"]:
            if v not in VARIANTS:
                raise ValueError(f"{where} variant {v!r}; expected one of {VARIANTS}")
        for h in axes["haystack"]:
            if h not in HAYSTACKS:
                raise ValueError(f"{where} haystack {h!r}; expected one of {HAYSTACKS}")
        for m in axes["mode"]:
            if m not in MODES:
                raise ValueError(f"{where} mode {m!r}; expected one of {MODES}")
        samples = table.get("samples", 3)
        # Checked before min() below, which would raise a TypeError naming nothing for a string.
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"{where} samples must be a positive int, got {samples!r}")
        seed = table.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{where} seed must be a non-negative int, got {seed!r}")
        if overrides.max_examples is not None:
            samples = min(samples, overrides.max_examples)
        dtype = table.get("dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"{where} dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        base = {
            "model": table.get("model", "smollm2-135m"),
            "samples": samples,
            "seed": table.get("seed", 0),
            "max_new_tokens": table.get("max_new_tokens", 24),
            "dtype": dtype,
            "share_prefill": bool(table.get("share_prefill", True)),
            "loglik": bool(table.get("loglik", True)),
            "prefill_chunk": table.get("prefill_chunk"),
            "batch_size": table.get("batch_size", 1),
            "policies": specs,
        }
        for name in ("samples", "max_new_tokens", "batch_size"):
            if isinstance(base[name], bool) or not isinstance(base[name], int) or base[name] < 1:
                raise ValueError(f"{where} {name} must be a positive int, got {base[name]!r}")
        for cell in grid(axes):
            NiahConfig(variant=cell["variant"], haystack=cell["haystack"], length=cell["length"])
        return [{**cell, **base} for cell in grid(axes)]

    def describe(self, config: dict[str, Any]) -> str:
        return (
            f"{config['model']} {config['variant']}/{config['haystack']} L={config['length']} "
            f"{config['mode']}"
        )

    def run(self, config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        from memlab.models.pretrained import load

        model, tok = load(config["model"], dtype=DTYPES[config["dtype"]], device=ctx.device)
        task = Niah(
            NiahConfig(
                variant=config["variant"],
                haystack=config["haystack"],
                length=config["length"],
                tokenizer=config["model"],
            )
        )
        samples = task.samples(tok, config["samples"], config["seed"])
        rows = evaluate(
            model,
            tok,
            samples,
            config["policies"],
            model_name=config["model"],
            mode=config["mode"],
            max_new_tokens=config["max_new_tokens"],
            share_prefill=config["share_prefill"],
            loglik=config["loglik"],
            prefill_chunk=config["prefill_chunk"],
            # The suite's batch_size was validated and stored but never reached evaluate().
            batch_size=config.get("batch_size", 1),
            log=ctx.log if ctx.progress else None,
        )
        agg = aggregate(rows)
        metrics: dict[str, Any] = {"policies": agg, "haystack_source": samples[0].meta["haystack_source"]}
        full = next((v for v in agg.values() if v["policy"] == "full"), None)
        if full is not None and "em" in full:
            metrics["full_em"] = full["em"]
        return metrics

    def summary(self, records: list[RunRecord]) -> Table:
        rows = []
        for r in records:
            if r.status != "done":
                continue
            for key, m in (r.metrics or {}).get("policies", {}).items():
                rows.append(
                    [
                        r.name,
                        key,
                        format_value(m.get("em")),
                        format_value(m.get("loglik")),
                        format_value(m.get("kv_fraction")),
                        format_value(m.get("attended_ratio")),
                        m.get("error", "")[:60],
                    ]
                )
        columns = ["run", "policy@budget", "exact match", "log-lik", "KV fraction", "read fraction", "note"]
        return Table(
            title="kv_niah: exact match, answer log-likelihood, KV held (fraction of full)",
            columns=columns,
            rows=rows,
        )

    def report(self, records: list[RunRecord], out_dir: Path, prefix: str) -> list[ReportSection]:
        done = [r for r in records if r.status == "done"]
        figures = []
        panels = []
        for r in done:
            series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
            for m in (r.metrics or {}).get("policies", {}).values():
                if "em" in m and "kv_fraction" in m:
                    xs, ys = series[m["label"]]
                    xs.append(m["kv_fraction"])
                    ys.append(m["em"])
            panel_series = [
                Series(
                    key=k,
                    x=[x for x, _ in sorted(zip(*v, strict=True))],
                    y=[y for _, y in sorted(zip(*v, strict=True))],
                    label=k,
                )
                for k, v in sorted(series.items())
            ]
            if panel_series:
                panels.append(
                    Panel(
                        title=r.name,
                        xlabel="KV bytes held / full",
                        ylabel="exact match",
                        series=panel_series,
                        ylim=(-0.05, 1.05),
                    )
                )
        if panels:
            name = f"{prefix}kv_accuracy.png"
            save_panels(out_dir / name, panels, suptitle="Accuracy vs KV held")
            title = "Exact match vs KV bytes held (fraction of the full cache)"
            figures.append(Figure(path=name, title=title))
        text = (
            "Mode `agnostic`: the context is compressed before the question arrives; `aware`: the "
            "question is part of the compressed prefill. KV fraction is measured from the tensors held."
        )
        return [
            ReportSection(
                title="KV-cache policies on needle prompts",
                text=text,
                tables=[self.summary(records)],
                figures=figures,
            )
        ]
