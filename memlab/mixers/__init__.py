"""Sequence mixers. Importing this package registers every mixer module listed below."""

from memlab.mixers import attention  # noqa: F401  (registers attention, sliding_window)
from memlab.mixers.base import MIXERS, Mixer, MixerConfig, State, build, names, state_nbytes

__all__ = ["MIXERS", "Mixer", "MixerConfig", "State", "build", "names", "state_nbytes"]
