"""Small run kinds for the runner and store tests: no training, controllable failures and hangs.

``fake`` section keys: ``runs`` (how many), ``fail`` (indices that raise), ``oom`` (indices that
raise torch.OutOfMemoryError), ``interrupt`` (indices that raise KeyboardInterrupt). When the
environment variable ``MEMLAB_TEST_HANG`` names a file, the run with index ``hang`` writes that
file and then sleeps, so a test can kill the process mid-run. Every call appends its index to the
file named by ``MEMLAB_TEST_CALLS`` (if set), so tests can count which runs really ran, across
processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from memlab.bench.jobs import JOBS, Job, Overrides, RunContext, check_keys, register_job


class FakeJob(Job):
    def expand(self, table: dict[str, Any], *, where: str, overrides: Overrides) -> list[dict[str, Any]]:
        check_keys(table, {"job", "runs", "fail", "oom", "interrupt", "hang"}, where, required={"runs"})
        return [
            {
                "index": i,
                "fail": i in table.get("fail", []),
                "oom": i in table.get("oom", []),
                "interrupt": i in table.get("interrupt", []),
                "hang": i == table.get("hang", -1),
                "epochs": overrides.epochs,
            }
            for i in range(table["runs"])
        ]

    def describe(self, config: dict[str, Any]) -> str:
        return f"fake #{config['index']}"

    def run(self, config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        calls = os.environ.get("MEMLAB_TEST_CALLS")
        if calls:
            with open(calls, "a") as f:
                f.write(f"{config['index']}\n")
        hang = os.environ.get("MEMLAB_TEST_HANG")
        if config["hang"] and hang:
            Path(hang).write_text("hanging")
            time.sleep(120)
        if config["fail"]:
            raise RuntimeError(f"boom in run {config['index']}")
        if config["oom"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        if config["interrupt"]:
            raise KeyboardInterrupt
        return {"value": 2.0 * config["index"], "loss": float("nan")}


if "fake" not in JOBS:
    register_job("fake")(FakeJob)
