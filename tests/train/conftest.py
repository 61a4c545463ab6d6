"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from trainhelp import StepRecorder


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core machine a second thread only adds contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def recorder():
    """Records the learning rate and gradient norm before every optimizer step of the test."""
    rec = StepRecorder()
    handle = register_optimizer_step_pre_hook(rec)
    yield rec
    handle.remove()
