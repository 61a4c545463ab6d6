"""One call that seeds every random number generator a run may touch."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (which seeds every device)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    # NumPy's legacy global seed must fit in 32 bits.
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
