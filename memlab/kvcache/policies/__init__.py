"""KV policies: one module per policy, each registered in ``POLICIES``.

``build(name, ratio=... or tokens=..., **options)`` makes one; ``names()`` lists them.
Importing this package imports every module in it, so a new policy is one new file.
"""


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
from memlab.registry import import_submodules

import_submodules(__name__, __path__, skip={"base"})

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
