"""What every training run kind stores about its training, and how a report names its end.

Shared by the ``mqar`` and ``passkey`` run kinds, so that their stored metrics and report columns
agree.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from memlab.train import TrainConfig, TrainResult


def training_metrics(result: TrainResult, tc: TrainConfig, t0: float) -> dict[str, Any]:
    """The metrics every training run kind stores: throughput, steps, loss, memory, wall time."""
    return {
        "train_tokens_per_s": result.tokens_per_s,
        "train_tokens": result.train_tokens,
        "train_wall_s": result.wall_s,
        "steps": result.steps,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "stopped_by_time": result.stopped_by_time,
        "final_loss": result.losses[-1] if result.losses else None,
        # Per epoch: steps, mean loss, eval accuracy (the last batch's loss alone can mislead,
        # e.g. a short batch that attention solves within one memory chunk).
        "epoch_history": result.epoch_history,
        "peak_memory_bytes": result.peak_memory_bytes,
        "wall_s": time.perf_counter() - t0,
        "train_config": dataclasses.asdict(tc),
    }


def training_end(metrics: dict[str, Any]) -> str:
    """How a run's training ended, for report tables: a diverged or time-capped run must show."""
    loss = metrics.get("final_loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return "diverged (loss not finite)"
    if metrics.get("stopped_by_time"):
        return f"time cap ({metrics.get('steps')} steps)"
    if metrics.get("stopped_early"):
        return "target reached"
    return "all epochs"
