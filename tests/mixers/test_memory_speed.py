"""The memory mixers are launch-bound on a GPU at batch 1: every aten op in the chunk loop is a
kernel launch per chunk. This pins the per-chunk op count of a titans_mac forward so that a
regression (an op moved back into the loop) shows up. Measured: 888 profiler events per chunk
before the chunk loop was trimmed, 402 after; the dispatch-level count below is a subset."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memlab import mixers

# Dispatch-level aten ops per 64-token chunk of a titans_mac forward (d_model 128, 2 heads):
# 342 before the trimming, 168 after; the bound leaves a 10% margin.
MAX_OPS_PER_CHUNK = 185


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(m: mixers.Mixer, t: int) -> int:
    x = torch.randn(1, t, 128)
    with torch.no_grad(), _Count() as c:
        m(x)
    return c.n


def test_titans_mac_ops_per_chunk_bounded() -> None:
    torch.manual_seed(0)
    m = mixers.build("titans_mac", d_model=128, n_heads=2, chunk_size=64).eval()
    per_chunk = (_ops(m, 64 * 6) - _ops(m, 64 * 2)) / 4  # the ops outside the chunk loop cancel
    assert per_chunk <= MAX_OPS_PER_CHUNK, f"{per_chunk} aten ops per chunk (bound {MAX_OPS_PER_CHUNK})"
