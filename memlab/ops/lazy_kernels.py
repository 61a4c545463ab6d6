"""What every op folder needs to run its Triton kernels: lazy import, availability, dispatch.

Kernels import on first use, so a missing or broken Triton never breaks ``import memlab``: the op
then runs its PyTorch reference (with a warning on CUDA, where the kernels were expected).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from torch import Tensor


def interpreting() -> bool:
    """Whether Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``, the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def describe(t: Tensor) -> str:
    """A tensor's shape, dtype and device, for error messages."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class LazyKernels:
    """The Triton modules of one op, imported on first use.

    ``label`` names the op in warnings; ``modules`` are the module paths that must all import.
    """

    def __init__(self, label: str, modules: tuple[str, ...]) -> None:
        self.label, self.names = label, modules
        self._modules: dict[str, ModuleType] = {}
        self._error: BaseException | None = None

    def module(self, name: str) -> ModuleType:
        if name not in self._modules:
            self._modules[name] = importlib.import_module(name)
        return self._modules[name]

    def available(self) -> bool:
        """Whether every kernel module imports (Triton installed and working)."""
        if self._error is not None:
            return False
        try:
            for name in self.names:
                self.module(name)
        except Exception as exc:  # any failure inside Triton's import machinery means "no kernels"
            self._error = exc
            return False
        return True

    def use(self, x: Tensor) -> bool:
        """Whether a call on ``x`` runs the kernels: CUDA, or the CPU under the interpreter."""
        if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
            return False
        if self.available():
            return True
        if x.is_cuda:
            warnings.warn(
                f"{self.label} Triton kernels unavailable ({self._error!r}); using the PyTorch reference",
                stacklevel=3,
            )
        return False
