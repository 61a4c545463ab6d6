"""What a run measures besides its task metric: state bytes, time, peak memory, environment.

- State bytes come from the state tensors themselves after a real prefill (``mixers.state_nbytes``),
  never from a formula, so a mixer that keeps more than it claims is caught.
- Time on CUDA uses events around the region after warm-up and reports the median.
- Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, the process RSS high-water mark on CPU.
- The environment (git sha, package versions, device name) is stored with every run.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memlab.mixers import state_nbytes

PACKAGES = ("torch", "triton", "transformers", "memlab")


# -- devices ------------------------------------------------------------------------------
def resolve_device(spec: str | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else CPU. ``"cuda"``/``"cuda:N"``/``"cpu"`` as given.

    Under torchrun (LOCAL_RANK set) ``auto`` and ``cuda`` pick the rank's own GPU.
    """
    if spec is None or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} was asked for but CUDA is not available here; use --device cpu"
            )
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU model, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({os.cpu_count()} cores, {threads} torch thread{'' if threads == 1 else 's'})"


# -- environment --------------------------------------------------------------------------
def git_sha(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the memlab checkout (with ``-dirty`` when it has uncommitted changes).

    None when memlab is not run from a git checkout (an installed wheel).
    """
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell where a number came from."""
    env: dict[str, Any] = {
        "git_sha": git_sha(),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


# -- state bytes --------------------------------------------------------------------------
@torch.no_grad()
def prefill_state_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of every tensor in the model's per-layer states after a prefill of ``ids``.

    ids: (1, L) token ids; the model is called as ``model(ids) -> (logits, states)`` (memlab LM).
    Batch 1 so the number is the memory one sequence needs to continue decoding.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, L) for a batch-1 prefill, got {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        _, states = model(ids)
    finally:
        model.train(was_training)
    return state_nbytes(states)


# -- time ---------------------------------------------------------------------------------
def call_times(fn: Callable[[], Any], *, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``, with no warm-up.

    On CUDA each call is timed with events (GPU time, no host overhead in between); on CPU with
    ``time.perf_counter``.
    """
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], Any], *, device: torch.device, warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (``call_times``) after ``warmup`` calls."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup} repeats={repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(call_times(fn, device=device, repeats=repeats))


# -- memory -------------------------------------------------------------------------------
def rss_peak_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_host_memory() -> None:
    """Hand freed host memory back to the system between large CPU work items.

    glibc keeps freed blocks of many sizes in its arenas; a CPU evaluation that allocates and frees
    gigabytes of differently shaped activations per batch then grows its resident set batch after
    batch (kv.py at 2k tokens, batch 10: +3.3 GB a batch, killed by the OOM killer at 24 GB) though
    nothing stays referenced. ``malloc_trim`` returns those blocks (RSS back to 3.8 GB after each
    batch); elsewhere (no glibc) this only collects cycles.
    """
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or another libc without malloc_trim
            pass


@dataclass
class PeakMemory:
    bytes: int = 0


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Peak memory during the block: CUDA allocator peak, or the CPU RSS high-water mark.

    The CPU number cannot be reset, so it is the process peak up to the end of the block.
    """
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            result.bytes = int(torch.cuda.max_memory_allocated(device))
        else:
            result.bytes = rss_peak_bytes()


def live_at_peak(snapshot: dict[str, Any], top: int = 8, keep: tuple[str, ...] = ("memlab", "transformers")
                 ) -> list[dict[str, Any]]:
    """The largest CUDA blocks live at the peak of an allocator history, and where they were made.

    ``snapshot``: ``torch.cuda.memory._snapshot()`` taken while ``_record_memory_history`` ran.
    Replays its alloc / free events, finds the moment the bytes allocated during the recording
    were highest, and returns up to ``top`` blocks live then, largest first: ``{"bytes": n,
    "frames": ["file:line function", ...]}`` with the Python frames from files whose path holds
    one of ``keep``, innermost first.
    """
    live: dict[int, dict[str, Any]] = {}
    total = best = 0
    at_best: list[dict[str, Any]] = []
    for trace in snapshot.get("device_traces", []):
        for event in trace:
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > best:
                    best = total
                    at_best = sorted(live.values(), key=lambda e: -e["size"])[:top]
            elif event["action"] == "free_requested" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
    blocks = []
    for event in at_best:
        frames = [f for f in event.get("frames", []) if any(k in f["filename"] for k in keep)]
        where = [f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}" for f in frames[:6]]
        blocks.append({"bytes": int(event["size"]), "frames": where})
    return blocks
