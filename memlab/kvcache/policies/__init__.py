"""KV policies: one module per policy, each registered in ``POLICIES``.

``build(name, ratio=... or tokens=..., **options)`` makes one; ``names()`` lists them.
Importing this package imports every module in it, so a new policy is one new file.
"""

import importlib
import pkgutil

from memlab.kvcache.policies.base import (
    POLICIES,
    FixedKeepPolicy,
    Observation,
    Policy,
    build,
    names,
    pool1d,
    register,
    split_exact,
)
from memlab.kvcache.policies.full import Full

_SHARED = {"base"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SHARED and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "POLICIES",
    "FixedKeepPolicy",
    "Full",
    "Observation",
    "Policy",
    "build",
    "names",
    "pool1d",
    "register",
    "split_exact",
]
