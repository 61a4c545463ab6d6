"""Synthetic passkey retrieval at the token level, for training mixers from scratch.

The passkey test of Landmark Attention (Mohtashami & Jaggi 2023) and RULER's single-needle task,
reduced to tokens so that a small LM can learn it without a text corpus. A sequence of length L is::

    filler ... filler  KEY d1 d2 .. dk  filler ... filler  QUERY d1 .. d(k-1)
                       ^ needle at depth p                 ^ question: the last k positions

Token ids: ``[0, n_digits)`` are the digits of the passkey, ``n_digits`` is the ``KEY`` marker
("the pass key is"), ``n_digits + 1`` the ``QUERY`` marker ("what is the pass key?"), and the
``filler_vocab`` ids after them are filler. Markers and digits never appear in the filler, so the
needle is the only place that holds the answer.

The passkey is ``key_len`` digits drawn independently and uniformly (repeats allowed, as in a real
passkey: copying by "the token after this digit" is ambiguous then, copying by offset is not).
The needle starts at ``p = round(depth * (L - 2k - 1))`` with ``depth`` uniform in
``[depth_min, depth_max]`` per sequence: depth 0 puts it first, depth 1 right before the question.

Filler (``filler``):
- ``"random"``: i.i.d. uniform filler tokens; nothing in it is worth remembering, and nothing in it
  can be compressed away either.
- ``"repeat"``: one phrase of ``period`` filler tokens repeated from position 0 (the needle and the
  question overwrite it). The phrase is drawn from ``phrase_seed`` and is part of the task: train
  and test share it, as every passkey prompt shares "The grass is green. The sky is blue...".

Targets follow the next-token convention of ``tasks.base``: the ``QUERY`` position is labelled
``d1`` and the position of answer digit ``d_i`` is labelled ``d_(i+1)``, so the question block is
answered under teacher forcing; every other target is -100. A sequence whose k labels are all
predicted is exactly one that greedy decoding after ``QUERY`` would answer correctly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memlab.tasks.base import (
    IGNORE_INDEX,
    Task,
    TaskConfig,
    TokenData,
    check_num_examples,
    register_task,
)

FILLERS = ("random", "repeat")


@dataclass(kw_only=True)
class PasskeyConfig(TaskConfig):
    seq_len: int = 1024
    key_len: int = 5
    n_digits: int = 10
    filler_vocab: int = 32
    filler: str = "random"
    period: int = 16
    phrase_seed: int = 0
    depth_min: float = 0.0
    depth_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("seq_len", "key_len", "filler_vocab", "period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PasskeyConfig.{name} must be a positive int, got {value!r}")
        # One digit alphabet of size 1 would make the answer known without reading the needle.
        if isinstance(self.n_digits, bool) or not isinstance(self.n_digits, int) or self.n_digits < 2:
            raise ValueError(f"PasskeyConfig.n_digits must be an int >= 2, got {self.n_digits!r}")
        if (
            isinstance(self.phrase_seed, bool)
            or not isinstance(self.phrase_seed, int)
            or self.phrase_seed < 0
        ):
            raise ValueError(
                f"PasskeyConfig.phrase_seed must be a non-negative int, got {self.phrase_seed!r}"
            )
        if self.filler not in FILLERS:
            raise ValueError(f"PasskeyConfig.filler must be one of {FILLERS}, got {self.filler!r}")
        # The needle (k + 1 tokens) and the question (k tokens) must both fit.
        if self.seq_len < 2 * self.key_len + 1:
            raise ValueError(
                f"PasskeyConfig.seq_len={self.seq_len} must be >= 2 * key_len + 1 = {2 * self.key_len + 1} "
                "(needle KEY d1..dk plus question QUERY d1..d(k-1))"
            )
        for name in ("depth_min", "depth_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"PasskeyConfig.{name} must be a number in [0, 1], got {value!r}")
            setattr(self, name, float(value))
        if self.depth_min > self.depth_max:
            raise ValueError(
                f"PasskeyConfig.depth_min={self.depth_min} must be <= depth_max={self.depth_max}"
            )


@register_task("passkey")
class Passkey(Task):
    """Token-level passkey retrieval; see the module docstring for the layout."""

    Config = PasskeyConfig
    config: PasskeyConfig

    @property
    def vocab_size(self) -> int:
        c = self.config
        return c.n_digits + 2 + c.filler_vocab

    @property
    def key_token(self) -> int:
        return self.config.n_digits

    @property
    def query_token(self) -> int:
        return self.config.n_digits + 1

    @property
    def filler_start(self) -> int:
        return self.config.n_digits + 2

    @property
    def max_needle_start(self) -> int:
        """The last position the needle may start at: it ends right before the question."""
        c = self.config
        return c.seq_len - 2 * c.key_len - 1

    def phrase(self) -> torch.Tensor:
        """(period,) int64: the repeated filler phrase of ``filler="repeat"``."""
        c = self.config
        gen = torch.Generator().manual_seed(c.phrase_seed)
        return torch.randint(0, c.filler_vocab, (c.period,), generator=gen) + self.filler_start

    def make(self, num_examples: int, seed: int) -> TokenData:
        """Draw ``num_examples`` sequences: inputs and targets (N, L) int64."""
        check_num_examples(num_examples, seed)
        c = self.config
        n, length, k = num_examples, c.seq_len, c.key_len
        gen = torch.Generator().manual_seed(seed)

        if c.filler == "random":
            inputs = torch.randint(0, c.filler_vocab, (n, length), generator=gen) + self.filler_start
        else:
            reps = math.ceil(length / c.period)
            inputs = self.phrase().repeat(reps)[:length].expand(n, length).clone()
        keys = torch.randint(0, c.n_digits, (n, k), generator=gen)  # (N, k)
        depth = c.depth_min + (c.depth_max - c.depth_min) * torch.rand(n, generator=gen, dtype=torch.float64)
        start = torch.round(depth * self.max_needle_start).long()  # (N,)

        rows = torch.arange(n)[:, None]
        offsets = torch.arange(k + 1)[None, :]
        needle = torch.cat([torch.full((n, 1), self.key_token, dtype=torch.int64), keys], dim=1)
        inputs[rows, start[:, None] + offsets] = needle
        question = length - k
        inputs[:, question] = self.query_token
        inputs[:, question + 1 :] = keys[:, :-1]
        targets = torch.full((n, length), IGNORE_INDEX, dtype=torch.int64)
        targets[:, question:] = keys
        return TokenData(inputs, targets)

    def needle_start(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, L) inputs of this task -> (N,) int64 position of each sequence's KEY marker."""
        if inputs.dim() != 2 or inputs.shape[1] != self.config.seq_len:
            raise ValueError(
                f"inputs must have shape (N, seq_len={self.config.seq_len}), got {tuple(inputs.shape)}"
            )
        is_key = inputs == self.key_token
        if not bool((is_key.sum(1) == 1).all()):
            raise ValueError("inputs must hold exactly one KEY marker per row; were they made by this task?")
        return is_key.long().argmax(1)

    def depth(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, L) inputs -> (N,) float64 needle depth in [0, 1].

        0: the needle opens the sequence; 1: it ends right before the question.
        """
        span = max(self.max_needle_start, 1)
        return self.needle_start(inputs).double() / span
