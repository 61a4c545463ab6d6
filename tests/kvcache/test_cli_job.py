"""The KV command-line pieces and the kv_niah run kind, on a tiny local checkpoint (no hub)."""

from __future__ import annotations

import argparse

import pytest
import torch
from kvtiny import tiny_checkpoint

from memlab.bench.jobs import Overrides, RunContext, build_job
from memlab.kvcache.cli import add_calibrate_parser, add_kv_parser, calibrate_duo_command, generate_command
from memlab.kvcache.policies.duo import load_gates


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_checkpoint(path)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="memlab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_kv_parser(sub)
    add_calibrate_parser(sub)
    return parser.parse_args(argv)


def test_kv_generate_prints_answer_and_bytes(checkpoint, tmp_path, capsys) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The grass is green . " * 30 + "The secret code for the vault is 4 2 .")
    question = tmp_path / "q.txt"
    question.write_text("What is the secret code for the vault ?")
    args = parse(["kv", "generate", "--model", str(checkpoint), "--policy", "snapkv", "--ratio", "0.5",
                  "--prompt-file", str(prompt), "--question-file", str(question), "--max-new-tokens", "4",
                  "--option", "window=4"])
    assert args.func is generate_command
    assert generate_command(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("KV bytes held: ") and "query-agnostic" in out[-1]
    held, full = (int(x.replace(",", "")) for x in out[-1].split(": ")[1].split(" for")[0].split(" of "))
    # Half the context is kept; the question and 3 fed-back tokens are appended in full.
    assert 0.45 < held / full < 0.75


def test_calibrate_duo_saves_gates(checkpoint, tmp_path) -> None:
    out = tmp_path / "gates.safetensors"
    args = parse(["calibrate", "duo", "--model", str(checkpoint), "--steps", "2", "--prompts", "2",
                  "--length", "160", "--sinks", "2", "--window", "8", "--out", str(out)])
    assert calibrate_duo_command(args) == 0
    gates, meta = load_gates(out)
    assert gates.shape == (2, 2) and ((gates >= 0) & (gates <= 1)).all()
    assert meta["steps"] == 2 and meta["window"] == 8


def test_kv_niah_job_expands_and_runs(checkpoint) -> None:
    job = build_job("kv_niah")
    table = {
        "job": "kv_niah", "model": str(checkpoint), "variant": "single", "length": [96],
        "mode": ["agnostic", "aware"], "samples": 2, "max_new_tokens": 3, "batch_size": 2,
        "policies": [{"name": "full"}, {"name": "snapkv", "ratio": [0.5, 0.25], "options": {"window": 4}},
                     {"name": "streaming", "ratio": 0.5}],
    }
    configs = job.expand(table, where="test [kv]", overrides=Overrides())
    assert [c["mode"] for c in configs] == ["agnostic", "aware"]
    metrics = job.run(configs[0], RunContext(device=torch.device("cpu"), progress=False))
    pol = metrics["policies"]
    assert set(pol) == {"full", "snapkv@0.5", "snapkv@0.25", "streaming@0.5"}
    assert pol["full"]["kv_fraction"] == 1.0
    assert pol["snapkv@0.25"]["kv_fraction"] < pol["snapkv@0.5"]["kv_fraction"] < 1.0
    assert all(isinstance(m["loglik"], float) and m["loglik"] < 0 for m in pol.values())
    table_rows = job.summary([type("R", (), {"status": "done", "name": "r", "metrics": metrics})()]).rows
    assert len(table_rows) == 4
    with pytest.raises(ValueError, match="unknown kv policy"):
        job.expand({**table, "policies": [{"name": "nope"}]}, where="t", overrides=Overrides())
    with pytest.raises(ValueError, match="batch_size"):
        job.expand({**table, "batch_size": 0}, where="t", overrides=Overrides())
    with pytest.raises(ValueError, match="mode"):
        job.expand({**table, "mode": "sideways"}, where="t", overrides=Overrides())
