"""Sequence mixers. Importing this package imports every module in it, so each mixer's
``@register`` decorator runs: adding a mixer is adding its file."""

import importlib
import pkgutil

from memlab.mixers.base import MIXERS, Mixer, MixerConfig, State, build, names, state_nbytes

_SHARED = {"base", "rope"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SHARED and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["MIXERS", "Mixer", "MixerConfig", "State", "build", "names", "state_nbytes"]
