"""The training loop every benchmark run uses: AdamW, warm-up + cosine schedule, clipping, early stop.

Training mixes several train sets (for instance MQAR at several lengths): every batch comes from one
set, so sequences in a batch share a length, and the batches of all sets are shuffled together each
epoch. Everything random is drawn from ``config.seed``, so on CPU the same seed gives the same loss
curve bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load_model, save_model
from torch import nn

from memlab.tasks.base import IGNORE_INDEX, TokenData, count_correct
from memlab.train.seed import seed_everything

# How often the progress bar reads the loss back from the device; every step would force a
# host-device synchronisation and slow GPU training.
_LOSS_DISPLAY_EVERY = 25


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation options of one run.

    ``target_accuracy``: stop after the first epoch at whose end every eval set reaches it.
    ``max_train_s``: a wall-clock cap on training (evaluation excluded), for GPU slices that give
    every mixer the same time. The cosine schedule then follows whichever runs out first, steps or
    time, so a capped run still anneals its learning rate before it stops (and evaluates).
    ``checkpoint``: a safetensors path written with the final weights.
    """

    lr: float
    epochs: int = 10
    batch_size: int = 64
    weight_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    target_accuracy: float | None = None
    max_train_s: float | None = None
    seed: int = 0
    progress: bool = True
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
        wd = self.weight_decay
        if not _is_number(wd) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {wd!r}")
        gc = self.grad_clip
        if gc is not None and (not _is_number(gc) or not math.isfinite(gc) or gc <= 0):
            raise ValueError(f"TrainConfig.grad_clip must be None or a finite number > 0, got {gc!r}")
        ta = self.target_accuracy
        if ta is not None and (not _is_number(ta) or not 0 < ta <= 1):
            raise ValueError(f"TrainConfig.target_accuracy must be None or in (0, 1], got {ta!r}")
        cap = self.max_train_s
        if cap is not None and (not _is_number(cap) or not math.isfinite(cap) or cap <= 0):
            raise ValueError(f"TrainConfig.max_train_s must be None or a finite number > 0, got {cap!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"TrainConfig.progress must be a bool, got {self.progress!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise ValueError(f"TrainConfig.checkpoint must be None or a path, got {self.checkpoint!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)




@dataclass
class TrainResult:
    """What a run measured. ``losses`` has one entry per optimizer step; accuracies are per eval set.

    ``epoch_history`` has one entry per evaluated epoch: ``epoch`` (1-based), ``steps`` (optimizer
    steps so far), ``mean_loss`` (over that epoch's steps) and ``accuracy`` (eval set -> accuracy),
    so a learning curve survives the run: where a run stalled, not only where it ended.

    ``tokens_per_s`` counts training tokens over pure training time (evaluation excluded);
    ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated`` on CUDA, else the process's RSS
    high-water mark (which covers the whole process, not only this run).
    """

    losses: list[float] = field(default_factory=list)
    eval_accuracy: dict[str, float] = field(default_factory=dict)
    best_accuracy: dict[str, float] = field(default_factory=dict)
    epoch_history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    steps: int = 0
    train_tokens: int = 0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    stopped_early: bool = False
    stopped_by_time: bool = False
    peak_memory_bytes: int = 0


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear warm-up reaches ``lr`` at step ``warmup_steps - 1``; a cosine then decays from ``lr`` at
    step ``warmup_steps`` towards 0, which it would reach at step ``total_steps``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _schedule_step(step: int, elapsed: float, total_steps: int, config: TrainConfig) -> int:
    # Under a time cap the schedule runs on the larger of the two clocks: the fraction of steps
    # done and the fraction of the time cap spent (the warm-up counts steps only).
    if config.max_train_s is None or step < config.warmup_steps:
        return step
    return max(step, int(elapsed / config.max_train_s * total_steps))


def seq_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions; 0 (with zero gradient) when none is labelled.

    logits: (B, T, V); targets: (B, T) with -100 where no loss applies.
    """
    flat = targets.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (flat != IGNORE_INDEX).sum().clamp_min(1)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # LM.forward returns (logits, states); a plain module returning logits also works.
    out = model(ids)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, *, batch_size: int, device: torch.device | str) -> float:
    """Accuracy over every labelled position of ``data`` (pooled, not averaged per batch).

    data: inputs and targets (N, T). The model's train/eval mode is restored afterwards.
    """
    if not isinstance(data, TokenData):
        raise ValueError(f"data must be a TokenData, got {type(data).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for i in range(0, len(data), batch_size):
            x = data.inputs[i : i + batch_size].to(device)
            y = data.targets[i : i + batch_size].to(device)
            c, n = count_correct(_logits(model, x), y)
            correct, total = correct + c, total + n
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("data holds no labelled position (every target is -100); accuracy is undefined")
    return correct / total


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's weights as safetensors (tied weights stored once), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    # A crash mid-write leaves the old checkpoint intact rather than a truncated file.
    os.replace(tmp, path)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights written by ``save_checkpoint``; missing or unexpected keys raise."""
    if not Path(path).is_file():
        raise ValueError(f"checkpoint path {str(path)!r} is not a file")
    load_model(model, str(path), strict=True)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices (projections, embeddings) only: decaying gains of norms and biases pulls
    # them towards 0, which fights the normalisation rather than regularising. A parameter marked
    # ``_no_weight_decay`` (Mamba's A_log and D, as its paper trains them) is never decayed.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            wd = p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
            (decay if wd else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _epoch_batches(sizes: list[int], batch_size: int, gen: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """(set index, example indices) for every batch of one epoch, in a shuffled order."""
    batches = []
    for k, n in enumerate(sizes):
        perm = torch.randperm(n, generator=gen)
        batches += [(k, perm[i : i + batch_size]) for i in range(0, n, batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[j] for j in order]


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _check_sets(model: nn.Module, train_sets: list[TokenData], eval_sets: dict[str, TokenData]) -> None:
    if not isinstance(train_sets, (list, tuple)) or not train_sets:
        raise ValueError(f"train_sets must be a non-empty list of TokenData, got {train_sets!r}")
    if not isinstance(eval_sets, dict):
        raise ValueError(f"eval_sets must be a dict name -> TokenData, got {type(eval_sets).__name__}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    named = [(f"train_sets[{i}]", d) for i, d in enumerate(train_sets)]
    named += [(f"eval_sets[{k!r}]", d) for k, d in eval_sets.items()]
    for name, d in named:
        if not isinstance(d, TokenData):
            raise ValueError(f"{name} must be a TokenData, got {type(d).__name__}")
        if len(d) == 0:
            raise ValueError(f"{name} holds no example")
        # Checked here rather than left to the embedding / cross-entropy, whose errors name no set.
        if int(d.inputs.min()) < 0:
            raise ValueError(f"{name} holds token id {int(d.inputs.min())}, expected ids >= 0")
        labelled = d.targets != IGNORE_INDEX
        if bool((d.targets[labelled] < 0).any()):
            raise ValueError(
                f"{name} holds target {int(d.targets[labelled].min())}, expected targets >= 0 or "
                f"{IGNORE_INDEX} (no label)"
            )
        if name.startswith("eval_sets") and not bool(labelled.any()):
            # Found now, not after a whole epoch of training when evaluate() would fail on it.
            raise ValueError(f"{name} holds no labelled position (every target is {IGNORE_INDEX})")
        if vocab is not None and int(d.inputs.max()) >= vocab:
            raise ValueError(
                f"{name} holds token id {int(d.inputs.max())}, expected ids below the model's "
                f"vocab_size={vocab}"
            )
        if vocab is not None and int(d.targets.max()) >= vocab:
            raise ValueError(
                f"{name} holds target {int(d.targets.max())}, expected targets below the model's "
                f"vocab_size={vocab}"
            )


def train(
    model: nn.Module,
    train_sets: list[TokenData],
    eval_sets: dict[str, TokenData],
    config: TrainConfig,
    device: torch.device | str,
) -> TrainResult:
    """Train ``model`` in place on ``train_sets`` and evaluate it on ``eval_sets`` after each epoch.

    Each TokenData holds inputs and targets (N, T); T may differ between sets. The model is moved
    to ``device``. The schedule spans ``epochs`` full epochs even when training stops early, so an
    early stop never changes the learning rate of the steps that ran. Training also stops, after
    evaluating, at the end of an epoch whose last loss is not finite (the run has diverged).
    Seeds every generator from ``config.seed`` first; build the model after ``seed_everything``
    for a fully reproducible run.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_sets(model, train_sets, eval_sets)
    if config.target_accuracy is not None and not eval_sets:
        raise ValueError("TrainConfig.target_accuracy needs at least one eval set, got eval_sets={}")
    device = torch.device(device)
    t_start = time.perf_counter()
    seed_everything(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)

    model.to(device)
    model.train()
    # Copy every set to the device once, not batch by batch: the sets are small next to the model's
    # activations, and a per-batch host-to-device copy would stall the GPU.
    sets = [d.to(device) for d in train_sets]
    evals = {name: d.to(device) for name, d in eval_sets.items()}
    sizes = [len(d) for d in sets]
    steps_per_epoch = sum(math.ceil(n / config.batch_size) for n in sizes)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, fused=on_cuda or None
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]

    result = TrainResult()
    train_time = 0.0
    step = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not config.progress, transient=False) as bar:
        job = bar.add_task("training", total=total_steps)
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            epoch_losses: list[torch.Tensor] = []
            for k, idx in _epoch_batches(sizes, config.batch_size, gen):
                elapsed = train_time + time.perf_counter() - t0
                if config.max_train_s is not None and elapsed >= config.max_train_s:
                    result.stopped_by_time = True
                    break
                idx = idx.to(device)
                x, y = sets[k].inputs[idx], sets[k].targets[idx]
                lr = lr_at(_schedule_step(step, elapsed, total_steps, config), lr=config.lr,
                           warmup_steps=config.warmup_steps, total_steps=total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = seq_loss(_logits(model, x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                epoch_losses.append(loss.detach())
                result.train_tokens += x.numel()
                step += 1
                bar.advance(job)
                if step % _LOSS_DISPLAY_EVERY == 0:
                    bar.update(job, description=f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}")
            if on_cuda:
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0
            if not epoch_losses:  # the time cap ran out exactly at an epoch boundary
                # Callers read eval_accuracy[name] for every eval set: a cap spent before the
                # first step still scores the (untrained) model once.
                if epoch == 0:
                    result.eval_accuracy = {
                        name: evaluate(model, d, batch_size=config.batch_size, device=device)
                        for name, d in evals.items()
                    }
                    result.best_accuracy = dict(result.eval_accuracy)
                break
            epoch_loss_values = torch.stack(epoch_losses).tolist()
            result.losses += epoch_loss_values
            result.epochs_run = epoch + 1

            accs = {
                name: evaluate(model, d, batch_size=config.batch_size, device=device)
                for name, d in evals.items()
            }
            result.eval_accuracy = accs
            result.epoch_history.append({
                "epoch": epoch + 1, "steps": step, "accuracy": dict(accs),
                "mean_loss": math.fsum(epoch_loss_values) / len(epoch_loss_values),
            })  # fmt: skip
            for name, acc in accs.items():
                result.best_accuracy[name] = max(acc, result.best_accuracy.get(name, 0.0))
            shown = " ".join(f"{n}={a:.3f}" for n, a in accs.items())
            bar.update(
                job, description=f"epoch {epoch + 1}/{config.epochs} loss {result.losses[-1]:.3f} {shown}"
            )
            if config.target_accuracy is not None and all(
                a >= config.target_accuracy for a in accs.values()
            ):
                result.stopped_early = epoch + 1 < config.epochs
                break
            if not math.isfinite(result.losses[-1]) or result.stopped_by_time:
                break

    result.steps = step
    result.tokens_per_s = result.train_tokens / train_time if train_time > 0 else 0.0
    result.peak_memory_bytes = (
        int(torch.cuda.max_memory_allocated(device)) if on_cuda else _peak_rss_bytes()
    )
    if config.checkpoint is not None:
        save_checkpoint(model, config.checkpoint)
    result.wall_s = time.perf_counter() - t_start
    return result
