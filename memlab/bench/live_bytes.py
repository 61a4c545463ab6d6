"""Peak bytes of live tensors during a region, tracked at the dispatcher (any device, CPU included).

The CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``; this counts what
the tensors themselves hold, so CPU runs can state decoding or prefill memory too. Tensors kept
only inside autograd's graph are counted as long as they live.

``with LiveBytes() as m: ...`` records every tensor an op creates (its storage's bytes, keyed by
the storage address) and drops it when the storage is freed; ``m.peak`` is the largest sum seen,
``m.current`` the sum now (both relative to the start: tensors that existed before are not
counted). ``top`` holds the biggest tensors live at the peak, for diagnosis.
"""

from __future__ import annotations

import traceback
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, trace_over: int | None = None, exclude: Any = ()) -> None:
        """``exclude``: tensors (a model's parameters) whose storages are never counted, even when
        an op inside the region returns a view of them (``aten.t`` of a weight)."""
        super().__init__()
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.trace_over = trace_over  # record where tensors of at least this many bytes are made
        self.top: list[tuple[int, str]] = []

    def _free(self, key: int) -> None:
        item = self.live.pop(key, None)
        if item is not None:
            self.current -= item[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if key == 0 or n == 0 or key in self.live or key in self.excluded:
                continue
            what = ""
            if self.trace_over is not None and n >= self.trace_over:
                stack = traceback.extract_stack()[:-1]
                frames = [f for f in stack if "memlab" in f.filename or "transformers" in f.filename]
                where = " < ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[-3:][::-1])
                what = f"{func} {tuple(t.shape)} {t.dtype} @ {where}"
            self.live[key] = (n, what)
            self.current += n
            weakref.finalize(st, self._free, key)
            if self.current > self.peak:
                self.peak = self.current
                if self.trace_over is not None:
                    self.top = sorted(((b, w) for b, w in self.live.values() if w), reverse=True)[:40]
        return out
