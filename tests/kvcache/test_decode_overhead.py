"""Host work of a decoding step: what the cache dispatches per layer, and that it never waits on
the device. On a GPU every dispatched op costs host time and every device->host read (``.item()``,
``bool(t)``, ``.tolist()``, ``nonzero``) stalls the host until the queue drains; both are counted
here on CPU, where they are the same ops, so the bounds hold on any machine."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from kvtiny import random_ids, tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from memlab.kvcache import KVCache, policies
from memlab.kvcache import cache as cache_mod
from memlab.kvcache.generate import decode_step, run_prompt
from memlab.ops import attention as ops_attention

SYNC_OPS = ("_local_scalar_dense", "nonzero", "tolist")


class CacheOps(TorchDispatchMode):
    """Counts ops dispatched while ``inside`` is set (the cache's code, not the model's)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.inside:
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


class ToList(TorchFunctionMode):
    """``tolist`` reads a tensor without the dispatcher on CPU: count it as a function call."""

    def __init__(self, counter: CacheOps) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.counter.inside and getattr(func, "__name__", "") == "tolist":
            self.counter.ops["tolist"] += 1
        return func(*args, **(kwargs or {}))


def _flagged(counter: CacheOps, fn: Any, value: bool) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        prev, counter.inside = counter.inside, value
        try:
            return fn(*args, **kwargs)
        finally:
            counter.inside = prev

    return wrapped


def decode_step_ops(
    monkeypatch: pytest.MonkeyPatch, name: str, batch: int = 2, **cfg: Any
) -> tuple[Counter[str], int]:
    """Ops the cache dispatches in one steady decoding step (the attention kernel excluded)."""
    model = tiny_model(layers=2, heads=4, kv_heads=2)
    cache = KVCache(model.config, policy=policies.build(name, **cfg))
    counter = CacheOps()
    for method in ("update", "attend"):
        wrapped = _flagged(counter, getattr(cache_mod.KVLayer, method), True)
        monkeypatch.setattr(cache_mod.KVLayer, method, wrapped)
    # The attention itself (kernel on GPU, its reference here) is not the cache's overhead.
    for fn in ("decode", "decode_reference"):
        monkeypatch.setattr(ops_attention, fn, _flagged(counter, getattr(ops_attention, fn), False))
    with torch.no_grad():
        logits = run_prompt(model, random_ids(batch, 48), cache)
        for _ in range(2):  # the first steps read the frozen budgets once
            logits = decode_step(model, cache, logits.argmax(dim=-1))
        with counter, ToList(counter):
            decode_step(model, cache, logits.argmax(dim=-1))
    return counter.ops, cache.n_layers


GATES = torch.tensor([[0.9, 0.1], [0.2, 0.8]])


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("full", {}),
        ("streaming", {"ratio": 0.5, "sinks": 2}),
        ("snapkv", {"ratio": 0.5, "window": 4}),
        ("h2o", {"ratio": 0.5}),
        ("duo", {"ratio": 0.5, "gates": GATES, "sinks": 2, "window": 6}),
        # CAKE splits budgets per sequence: only a single sequence is sure to hold equal lengths.
        ("cake", {"ratio": 0.5, "window": 4, "batch": 1}),
    ],
)
def test_decoding_step_never_syncs(monkeypatch: pytest.MonkeyPatch, name: str, cfg: dict) -> None:
    # Budgets and equal lengths are known on the host after the first steps: a steady step
    # decides what to keep and evict without reading the device (ALISA's host tier does read it;
    # unequal lengths across a batch are read from the device).
    ops, _ = decode_step_ops(monkeypatch, name, **cfg)
    assert sum(ops[op] for op in SYNC_OPS) == 0, dict(ops)


def test_full_decoding_step_dispatches_few_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    # Per layer: the three concatenations that store the token, lengths and seen counts, views and
    # the int32 lengths for the kernel (15 ops). Building a ones mask, positions by cumsum,
    # list-indexed head copies and per-step reads of the lengths took 45.
    ops, n_layers = decode_step_ops(monkeypatch, "full")
    per_layer = sum(ops.values()) / n_layers
    assert per_layer <= 16, dict(ops)
