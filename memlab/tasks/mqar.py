"""Multi-query associative recall (MQAR), following the zoology protocol (Arora, Eyuboglu et al.).

A sequence of length L over a vocabulary of V tokens starts with P key-value pairs
``k1 v1 k2 v2 ... kP vP``: keys are distinct tokens from ``[1, V // 2)``, values distinct tokens from
``[V // 2, V)`` (token 0 is the "empty" filler and is never a key). The remaining ``L - 2P`` positions
hold ``(L - 2P) // 2`` query slots at even offsets; each key is placed once, in a slot chosen without
replacement with probability ``p(g) ~ power_a * g ** (power_a - 1)`` for gap index ``g = 1, 2, ...``:
with the default ``power_a = 0.01`` early slots are strongly favoured, as repeated bigrams are in text;
``power_a = 1`` is uniform. The label of a query sits at the query key's own position (the model must
predict the value as the next token); every other target is -100. Positions that are neither pairs
nor queries hold uniformly random tokens when ``random_non_queries`` (else 0).
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

# Examples are drawn in blocks so that sampling distinct keys from a large key vocabulary
# (a (block, V/2) random matrix) keeps memory bounded for any number of examples.
_BLOCK = 2048


@dataclass(kw_only=True)
class MQARConfig(TaskConfig):
    vocab_size: int = 8192
    seq_len: int = 64
    num_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MQARConfig.{name} must be a positive int, got {value!r}")
        # Each of the P queries needs its own slot among the (L - 2P) // 2 after the pairs;
        # zoology asks for L >= 4P, which guarantees that.
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(
                f"MQARConfig.seq_len={self.seq_len} must be >= 4 * num_pairs = {4 * self.num_pairs}"
            )
        n_keys = self.vocab_size // 2 - 1
        n_values = self.vocab_size - self.vocab_size // 2
        if min(n_keys, n_values) < self.num_pairs:
            raise ValueError(
                f"MQARConfig.vocab_size={self.vocab_size} leaves {n_keys} keys and {n_values} values, "
                f"fewer than num_pairs={self.num_pairs}; expected vocab_size >= {2 * self.num_pairs + 2}"
            )
        a = self.power_a
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"MQARConfig.power_a must be a finite number > 0, got {a!r}")
        self.power_a = float(a)
        if not isinstance(self.random_non_queries, bool):
            raise ValueError(
                f"MQARConfig.random_non_queries must be a bool, got {self.random_non_queries!r}"
            )


def gap_probabilities(num_slots: int, power_a: float) -> torch.Tensor:
    """p(g) for query slots g = 0 .. num_slots - 1 (slot g is 2g tokens after the pairs).

    Returns (num_slots,) float64 summing to 1.
    """
    g = torch.arange(1, num_slots + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def _distinct_uniform(n: int, population: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) int64: per row, k distinct integers from [0, population), uniformly at random.

    When k is small against the population (k * k <= 4 * population: at most about 90% of rows
    hold a repeat, so the redraws still shrink geometrically), rows are drawn with replacement and only
    the rows with a repeat are redrawn: conditioning on "all distinct" gives exactly the uniform
    law over ordered k-subsets. Otherwise the top-k of i.i.d. uniforms is used: a uniform k-subset
    in uniform order, at O(population) cost per row.
    """
    if k * k <= 4 * population:
        out = torch.randint(0, population, (n, k), generator=gen)
        todo = torch.arange(n)
        while True:
            srt = out[todo].sort(dim=1).values
            todo = todo[(srt[:, 1:] == srt[:, :-1]).any(dim=1)]
            if todo.numel() == 0:
                return out
            out[todo] = torch.randint(0, population, (todo.numel(), k), generator=gen)
    out = torch.empty(n, k, dtype=torch.int64)
    for i in range(0, n, _BLOCK):
        rows = min(_BLOCK, n - i)
        out[i : i + rows] = torch.rand(rows, population, generator=gen).topk(k, dim=1).indices
    return out


def _weighted_without_replacement(
    n: int, probs: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """(n, k) int64: per row, k distinct indices drawn one after another with probabilities ``probs``.

    Adding Gumbel noise to log-probabilities and taking the top k gives exactly the law of
    sequential draws without replacement (each draw renormalised over what is left), in draw order.
    """
    u = torch.rand(n, probs.numel(), generator=gen, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (probs.log()[None, :] + gumbel).topk(k, dim=1).indices


@register_task("mqar")
class MQAR(Task):
    """Multi-query associative recall; see the module docstring for the exact layout."""

    Config = MQARConfig
    config: MQARConfig

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_slots(self) -> int:
        c = self.config
        return (c.seq_len - 2 * c.num_pairs) // 2

    def make(self, num_examples: int, seed: int) -> TokenData:
        """Draw ``num_examples`` sequences: inputs and targets (N, L) int64."""
        check_num_examples(num_examples, seed)
        c = self.config
        n, p, length, half = num_examples, c.num_pairs, c.seq_len, c.vocab_size // 2
        gen = torch.Generator().manual_seed(seed)

        keys = _distinct_uniform(n, half - 1, p, gen) + 1  # (N, P) in [1, V/2)
        values = _distinct_uniform(n, c.vocab_size - half, p, gen) + half  # (N, P) in [V/2, V)
        gaps = _weighted_without_replacement(n, gap_probabilities(self.num_slots, c.power_a), p, gen)

        if c.random_non_queries:
            inputs = torch.randint(0, c.vocab_size, (n, length), generator=gen)
        else:
            inputs = torch.zeros(n, length, dtype=torch.int64)
        targets = torch.full((n, length), IGNORE_INDEX, dtype=torch.int64)
        inputs[:, 0 : 2 * p : 2] = keys
        inputs[:, 1 : 2 * p : 2] = values
        query_pos = 2 * p + 2 * gaps  # (N, P): where pair j's key is asked
        inputs.scatter_(1, query_pos, keys)
        targets.scatter_(1, query_pos, values)
        return TokenData(inputs, targets)
