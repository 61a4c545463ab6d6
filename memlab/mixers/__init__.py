"""Sequence mixers. Importing this package imports every module in it, so each mixer's
``@register`` decorator runs: adding a mixer is adding its file."""


from memlab.mixers.base import MIXERS, Mixer, MixerConfig, State, build, names, state_nbytes
from memlab.registry import import_submodules

import_submodules(__name__, __path__, skip={"base", "rope"})

__all__ = ["MIXERS", "Mixer", "MixerConfig", "State", "build", "names", "state_nbytes"]
