"""The Task protocol: a task makes token data (inputs and per-position targets) and scores logits.

Targets follow the next-token convention used by the LM and the trainer: ``targets[:, t]`` is what
the model should predict from position t (the token that comes after ``inputs[:, t]``), or -100 where
no loss or metric applies. Loss and accuracy therefore compare ``logits[:, t]`` with ``targets[:, t]``
without any further shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memlab.registry import Registry, make_config

IGNORE_INDEX = -100

TASKS: Registry[type[Task]] = Registry("task")


@dataclass
class TokenData:
    """A set of N token sequences of one length T.

    inputs: (N, T) int64 token ids; targets: (N, T) int64 with IGNORE_INDEX (-100) where no
    loss or metric applies.
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("inputs", "targets"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"TokenData.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 2 or value.dtype != torch.int64:
                raise ValueError(
                    f"TokenData.{name} must be an (N, T) int64 tensor, got shape {tuple(value.shape)} "
                    f"dtype {value.dtype}"
                )
        if self.inputs.shape != self.targets.shape:
            raise ValueError(
                f"TokenData.inputs shape {tuple(self.inputs.shape)} must equal targets shape "
                f"{tuple(self.targets.shape)}"
            )

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def subset(self, n: int) -> TokenData:
        """The first ``n`` examples (a view, no copy)."""
        if not isinstance(n, int) or not 0 <= n <= len(self):
            raise ValueError(f"subset n must be an int in [0, {len(self)}], got {n!r}")
        return TokenData(self.inputs[:n], self.targets[:n])

    def to(self, device: torch.device | str) -> TokenData:
        return TokenData(self.inputs.to(device), self.targets.to(device))


@dataclass(kw_only=True)
class TaskConfig:
    """Options shared by all tasks; subclasses add their own fields and checks."""


class Task:
    """Base class of every task: ``Config`` holds its options, ``make`` draws a data set."""

    Config: ClassVar[type[TaskConfig]] = TaskConfig
    name: ClassVar[str] = ""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @property
    def vocab_size(self) -> int:
        """How many token ids the data may contain (the LM's vocabulary must be at least this)."""
        raise NotImplementedError

    def make(self, num_examples: int, seed: int) -> TokenData:
        """Draw ``num_examples`` sequences; the same seed always gives the same data."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def register_task(name: str):
    """Class decorator: add a Task subclass to the registry under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        return TASKS.register(name)(cls)

    return deco


def build(name: str, **cfg: Any) -> Task:
    """Build task ``name`` from its options; unknown keys raise ValueError."""
    cls = TASKS.get(name)
    return cls(make_config(cls.Config, f"task {name!r}", cfg))


def names() -> list[str]:
    return TASKS.names()


def check_num_examples(num_examples: Any, seed: Any) -> None:
    """Shared argument checks of ``Task.make``."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of labelled positions (target != -100) where argmax(logits) == target.

    logits: (N, T, V); targets: (N, T).
    """
    correct, total = count_correct(logits, targets)
    if total == 0:
        raise ValueError("targets hold no labelled position (every entry is -100); accuracy is undefined")
    return correct / total


def count_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, labelled) counts, so that accuracy over batches is pooled, not averaged per batch.

    logits: (N, T, V); targets: (N, T).
    """
    if logits.dim() != 3 or targets.dim() != 2 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits must be (N, T, V) and targets (N, T) with the same N, T; got logits "
            f"{tuple(logits.shape)}, targets {tuple(targets.shape)}"
        )
    mask = targets != IGNORE_INDEX
    hits = (logits.argmax(-1) == targets) & mask
    return int(hits.sum().item()), int(mask.sum().item())
