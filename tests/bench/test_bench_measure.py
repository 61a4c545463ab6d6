"""measure: devices, environment, state bytes from a real prefill, timing."""

from __future__ import annotations

import re

import pytest
import torch

from memlab.bench.measure import (
    device_name,
    environment,
    git_sha,
    median_time,
    package_versions,
    peak_memory,
    prefill_state_bytes,
    release_host_memory,
    resolve_device,
)
from memlab.models.lm import LM

CPU = torch.device("cpu")


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="got 'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_environment_names_code_packages_and_device() -> None:
    env = environment(CPU)
    assert set(env["versions"]) == {"torch", "triton", "transformers", "memlab"}
    assert env["versions"]["torch"] == package_versions(("torch",))["torch"]
    assert env["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["device"] == "cpu" and env["device_name"] == device_name(CPU)
    assert "cores" in device_name(CPU)
    sha = git_sha()
    assert sha is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", sha)
    assert package_versions(("surely-not-installed-pkg",)) == {"surely-not-installed-pkg": None}


def test_state_bytes_are_measured_after_a_prefill() -> None:
    torch.manual_seed(0)
    att = LM.from_mixer("attention", vocab_size=32, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2)
    for length in (5, 12):
        ids = torch.randint(0, 32, (1, length))
        # KV cache: 3 layers x (k, v) x 2 KV heads x L x head_dim 4 x 4 bytes (float32).
        assert prefill_state_bytes(att, ids) == 3 * 2 * 2 * length * 4 * 4
    swa = LM.from_mixer("sliding_window", vocab_size=32, d_model=16, n_layers=1, n_heads=4, window=4)
    short = prefill_state_bytes(swa, torch.randint(0, 32, (1, 10)))
    long = prefill_state_bytes(swa, torch.randint(0, 32, (1, 40)))
    assert short == long == 2 * 4 * 3 * 4 * 4  # keeps window - 1 = 3 keys and values
    att.train()
    prefill_state_bytes(att, torch.randint(0, 32, (1, 3)))
    assert att.training, "the model's mode is restored"
    with pytest.raises(ValueError, match=r"ids must have shape \(1, L\)"):
        prefill_state_bytes(att, torch.randint(0, 32, (2, 3)))


def test_median_time_and_peak_memory() -> None:
    calls = []
    t = median_time(lambda: calls.append(sum(range(1000))), device=CPU, warmup=2, repeats=5)
    assert len(calls) == 7 and 0 < t < 1
    with pytest.raises(ValueError, match="repeats >= 1"):
        median_time(lambda: None, device=CPU, repeats=0)
    with peak_memory(CPU) as peak:
        block = torch.ones(4 * 2**20)  # 16 MiB
    assert peak.bytes >= block.numel() * 4


def test_release_host_memory_frees_unreachable_tensors() -> None:
    """Tensors kept alive only by a reference cycle are freed by the call (the cycle collector
    part; the trim of glibc's arenas has no observable result beyond the process's RSS)."""
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    a.tensor = torch.zeros(1 << 16)
    alive = weakref.ref(a.tensor)
    del a, b
    release_host_memory()
    assert alive() is None
