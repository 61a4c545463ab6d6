"""Runner, store and report with other inputs: bad suites, empty grids, filters that match nothing,
--limit 0, failing runs, resume, reports of stores that hold only failures, unusable store paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import bench_fake_jobs  # noqa: F401 - registers the ``fake`` run kind
import pytest
import torch

from memlab.bench.jobs import Overrides
from memlab.bench.report import write_report
from memlab.bench.runner import expand_suite, load_suite, run_suite, summary_tables
from memlab.bench.store import Store
from memlab.cli import main

CPU = torch.device("cpu")


def quiet(_msg: str) -> None:
    pass


def write(tmp_path: Path, text: str, name: str = "suite.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def calls(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


MQAR = """
[m]
job = "mqar"
d_model = [16]
lr = [1e-3]
task_options = { vocab_size = 16 }
train = { epochs = 1, batch_size = 8 }
train_sets = [ { seq_len = 16, num_pairs = 2, num_examples = 16 } ]
test_sets = [ { seq_len = 16, num_pairs = 2, num_examples = 8 } ]
[[m.mixers]]
name = "attention"
options = { n_heads = 1 }
"""


def mqar_suite(tmp_path: Path, old: str = "", new: str = "", name: str = "suite.toml") -> Path:
    text = MQAR.replace(old, new) if old else MQAR
    if old:
        assert old in MQAR, old
    return write(tmp_path, text, name)


# -- bad suites ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "old,new,words",
    [
        ('job = "mqar"', 'job = "mqar"\ncolour = 1', ["unknown key(s) ['colour']", "[m]"]),
        ("options = { n_heads = 1 }", "options = { n_heads = 1 }\nflavour = 2", ["['flavour']", "mixers[0]"]),
        ("vocab_size = 16", "vocab_size = 16, vocab = 3", ["['vocab']", "task_options"]),
        ("epochs = 1", "epoch = 1", ["['epoch']", "train"]),
        ('name = "attention"', 'name = "attentionn"', ["unknown mixer 'attentionn'", "mixers[0]"]),
        ('job = "mqar"', 'job = "mqar"\ntask = "mqarr"', ["unknown task 'mqarr'", "[m]"]),
        ("d_model = [16]", "d_model = []", ["d_model", "at least one value"]),
        ("lr = [1e-3]", "lr = []", ["lr", "at least one value"]),
        ('job = "mqar"', 'job = "mqar"\nseed = []', ["seed", "at least one value"]),
        ('job = "mqar"', 'job = "mqar"\nsweep = { train = { epochs = [] } }', ["train.epochs", "non-empty"]),
        ("options = { n_heads = 1 }", "options = { n_heads = 1 }\nsweep = { n_heads = [] }", ["n_heads"]),
        (
            "train_sets = [ { seq_len = 16, num_pairs = 2, num_examples = 16 } ]",
            "train_sets = []",
            ["train_sets", "non-empty"],
        ),
        ("num_examples = 8", "num_examples = 0", ["num_examples", "positive"]),
        ("num_pairs = 2, num_examples = 8", "num_pairs = 5, num_examples = 8", ["seq_len=16", "test_sets"]),
        ("vocab_size = 16", "vocab_size = 5", ["vocab_size=5"]),
        ("options = { n_heads = 1 }", "options = { n_head = 1 }", ["n_head", "attention"]),
        ("lr = [1e-3]", 'lr = ["fast"]', ["lr", "'fast'"]),
        ('job = "mqar"', 'job = "mqar"\nn_layers = 0', ["n_layers", "0"]),
        (  # more sets than data seeds a suite seed owns: they would reuse the next seed's data
            "test_sets = [ { seq_len = 16, num_pairs = 2, num_examples = 8 } ]",
            "test_sets = [" + ", ".join(f"{{ seq_len = 16, num_pairs = 2, num_examples = 8, name = 's{i}' }}"
                                         for i in range(1001)) + "]",
            ["test_sets", "1001 sets", "at most 1000"],
        ),
    ],
)
def test_bad_mqar_sections_name_the_problem(tmp_path, old: str, new: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        expand_suite(load_suite(mqar_suite(tmp_path, old, new)))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_an_unknown_task_given_as_a_list_is_a_value_error(tmp_path) -> None:
    path = mqar_suite(tmp_path, 'job = "mqar"', 'job = "mqar"\ntask = ["mqar"]')
    with pytest.raises(ValueError, match="unknown task"):
        expand_suite(load_suite(path))


def test_empty_mixer_list_and_all_optional_missing(tmp_path) -> None:
    text = MQAR.split("[[m.mixers]]")[0] + "mixers = []\n"
    with pytest.raises(ValueError, match="mixers must be a non-empty list"):
        expand_suite(load_suite(write(tmp_path, text)))
    # Every mixer optional and absent: the section expands to no run, with a note for each.
    text = MQAR.replace('name = "attention"', 'name = "no_such"\noptional = true')
    specs, notes = expand_suite(load_suite(write(tmp_path, text, "opt.toml")))
    assert specs == [] and any("no_such" in n for n in notes)


# -- filter, limit, failures and resume ---------------------------------------------------
def fake_suite(tmp_path: Path, runs: int, extra: str = "") -> Path:
    return write(tmp_path, f'[main]\njob = "fake"\nruns = {runs}\n{extra}\n', "fake.toml")


def test_filter_that_matches_nothing_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
    suite = load_suite(fake_suite(tmp_path, 3))
    with Store(tmp_path / "s.sqlite") as store:
        for pattern in ("nomatch", " , "):
            with pytest.raises(ValueError, match="matches none of the 3 runs"):
                run_suite(suite, store, device=CPU, pattern=pattern, progress=False, log=quiet)
        assert store.records() == [] and calls(log) == []
        res = run_suite(suite, store, device=CPU, pattern="#2,#0", progress=False, log=quiet)
        assert (res.planned, res.done) == (2, 2) and sorted(calls(log)) == [0, 2]


def test_limit_zero_runs_nothing_and_leaves_every_run_pending(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
    suite = load_suite(fake_suite(tmp_path, 3))
    with Store(tmp_path / "s.sqlite") as store:
        res = run_suite(suite, store, device=CPU, limit=0, progress=False, log=quiet)
        assert (res.planned, res.done, res.failed, res.already_done) == (3, 0, 0, 0)
        assert store.records() == [] and calls(log) == []
        with pytest.raises(ValueError, match="limit"):
            run_suite(suite, store, device=CPU, limit=-1, progress=False, log=quiet)


def test_failures_are_stored_with_their_error_and_resume_reruns_only_them(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
    suite = load_suite(fake_suite(tmp_path, 5, "fail = [1, 3]\noom = [4]"))
    with Store(tmp_path / "s.sqlite") as store:
        res = run_suite(suite, store, device=CPU, progress=False, log=quiet)
        assert (res.done, res.failed) == (2, 3) and calls(log) == [0, 1, 2, 3, 4]
        assert res.failed_names == ["main: fake #1", "main: fake #3", "main: fake #4"]
        by_name = {r.name: r for r in store.records()}
        assert by_name["main: fake #1"].status == "failed"
        assert by_name["main: fake #1"].error_line == "RuntimeError: boom in run 1"
        assert "Traceback" in by_name["main: fake #3"].error
        assert "OutOfMemoryError" in by_name["main: fake #4"].error_line
        assert by_name["main: fake #2"].metrics["value"] == 4.0 and by_name["main: fake #2"].error is None
        # No retry of failures: nothing runs again.
        res = run_suite(suite, store, device=CPU, retry_failed=False, progress=False, log=quiet)
        assert (res.done, res.failed, res.already_done) == (0, 0, 5) and len(calls(log)) == 5
        # Retry: only the failed ones run again (and fail again), the done ones are skipped.
        res = run_suite(suite, store, device=CPU, progress=False, log=quiet)
        assert (res.done, res.failed, res.already_done) == (0, 3, 2)
        assert calls(log)[5:] == [1, 3, 4]
        assert store.get(by_name["main: fake #1"].id).attempts == 2
        assert store.get(by_name["main: fake #0"].id).attempts == 1


def test_overrides_give_their_own_run_ids(tmp_path) -> None:
    suite = load_suite(fake_suite(tmp_path, 2))
    plain, _ = expand_suite(suite)
    short, _ = expand_suite(suite, Overrides(epochs=1))
    assert {s.id for s in plain}.isdisjoint({s.id for s in short})
    assert [s.name for s in plain] == [s.name for s in short]


# -- reports of failed runs ---------------------------------------------------------------
def _fail_all(tmp_path: Path, suite_path: Path, store_path: Path) -> None:
    with Store(store_path) as store:
        run_suite(load_suite(suite_path), store, device=CPU, progress=False, log=quiet)


def test_report_of_a_store_with_only_failed_runs(tmp_path) -> None:
    store_path = tmp_path / "s.sqlite"
    _fail_all(tmp_path, fake_suite(tmp_path, 2, "fail = [0, 1]"), store_path)
    paths = write_report(store_path, tmp_path / "rep")
    md, page = paths.markdown.read_text(), paths.index.read_text()
    assert paths.figures == []
    assert "0 finished runs of 2" in md
    for text in (md, page):
        assert "RuntimeError: boom in run 0" in text and "RuntimeError: boom in run 1" in text
    assert "2 failed, 0 interrupted or killed" in md


def test_mqar_report_and_summary_with_only_failed_runs(tmp_path) -> None:
    store_path = tmp_path / "s.sqlite"
    spec = expand_suite(load_suite(mqar_suite(tmp_path)))[0][0]
    with Store(store_path) as store:
        store.claim(
            run_id=spec.id, suite=spec.suite, section=spec.section, job=spec.job, name=spec.name,
            config=spec.config, seed=0, device="cpu", env={},
        )
        store.fail(spec.id, "Traceback ...\nRuntimeError: no memory left")
        tables = summary_tables(store, spec.suite)
        assert len(tables) == 1 and tables[0].rows == []
    paths = write_report(store_path, tmp_path / "rep")
    md = paths.markdown.read_text()
    assert "No finished runs yet (1 failed)" in md and "RuntimeError: no memory left" in md
    assert paths.figures == []


def test_report_of_an_empty_store_and_of_an_unknown_suite(tmp_path) -> None:
    store_path = tmp_path / "s.sqlite"
    Store(store_path).close()
    paths = write_report(store_path, tmp_path / "rep")
    assert "0 finished runs of 0" in paths.markdown.read_text()
    with pytest.raises(ValueError, match="suite 'nope' has no runs"):
        write_report(store_path, tmp_path / "rep", suite="nope")


# -- store paths --------------------------------------------------------------------------
def test_unusable_store_paths_are_value_errors_naming_them(tmp_path) -> None:
    not_db = tmp_path / "notes.sqlite"
    not_db.write_text("these are not the runs you are looking for\n" * 20)
    with pytest.raises(ValueError, match="notes.sqlite"):
        Store(not_db)
    assert not_db.read_text().startswith("these are not")  # left untouched
    under_file = not_db / "s.sqlite"
    with pytest.raises(ValueError, match="s.sqlite"):
        Store(under_file)
    with pytest.raises(ValueError, match="is a directory"):
        Store(tmp_path)


# -- the CLI on these inputs: exit codes and messages, never a traceback ------------------
def test_cli_failing_runs_strict_and_report(tmp_path, capsys) -> None:
    suite = fake_suite(tmp_path, 3, "fail = [1]")
    store = tmp_path / "s.sqlite"
    args = ["run", str(suite), "--store", str(store), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs done, 1 failed, 0 already done of 3" in out and "failed: main: fake #1" in out
    assert main([*args, "--strict"]) == 1  # the failed run is retried, fails again
    assert "0 runs done, 1 failed, 2 already done of 3" in capsys.readouterr().out
    assert main([*args, "--skip-failed", "--strict"]) == 0
    assert "0 runs done, 0 failed, 3 already done" in capsys.readouterr().out
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "rep")]) == 0
    assert "boom in run 1" in (tmp_path / "rep" / "results.md").read_text()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--filter", "nomatch"], ["'nomatch'", "matches none of the 3 runs"]),
        (["--filter", "nomatch", "--dry-run"], ["'nomatch'", "matches none"]),
    ],
)
def test_cli_filter_matching_nothing_exits_2(tmp_path, capsys, extra: list[str], words: list[str]) -> None:
    suite = fake_suite(tmp_path, 3)
    store = tmp_path / "s.sqlite"
    assert main(["run", str(suite), "--store", str(store), "--device", "cpu", *extra]) == 2
    out = capsys.readouterr().out
    assert all(w in out for w in words) and "Traceback" not in out


def test_cli_limit_zero_and_bad_store(tmp_path, capsys) -> None:
    suite = fake_suite(tmp_path, 2)
    store = tmp_path / "s.sqlite"
    assert main(["run", str(suite), "--store", str(store), "--device", "cpu", "--limit", "0"]) == 0
    assert "0 runs done, 0 failed, 0 already done of 2" in capsys.readouterr().out
    with Store(store) as s:
        assert s.records() == []
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not sqlite at all, just some text\n" * 10)
    assert main(["run", str(suite), "--store", str(bad), "--device", "cpu"]) == 2
    assert "bad.sqlite" in capsys.readouterr().out
    assert main(["report", "--store", str(bad), "--out", str(tmp_path / "rep")]) == 2
    assert "bad.sqlite" in capsys.readouterr().out
    assert main(["run", str(suite), "--store", str(bad), "--dry-run"]) == 2
    assert "bad.sqlite" in capsys.readouterr().out


# -- kv_niah: suite keys reach the evaluation ---------------------------------------------
def test_kv_niah_batch_size_reaches_the_evaluation(monkeypatch) -> None:
    from memlab.bench.jobs import RunContext, build_job, kv_niah
    from memlab.tasks.niah import NiahSample

    seen: dict = {}

    def fake_evaluate(model, tok, samples, specs, **kwargs):
        seen.update(kwargs, n_samples=len(samples))
        return []

    sample = NiahSample(
        context_ids=torch.arange(4), question_ids=torch.arange(2), answer_ids=torch.arange(1),
        answer="1", values=["1"], depths=[0.5], needle_positions=[1], meta={"haystack_source": "x"},
    )
    monkeypatch.setattr("memlab.models.pretrained.load", lambda *a, **k: (None, None))
    monkeypatch.setattr(kv_niah.Niah, "samples", lambda self, tok, n, seed: [sample] * n)
    monkeypatch.setattr(kv_niah, "evaluate", fake_evaluate)
    job = build_job("kv_niah")
    table = {"job": "kv_niah", "policies": [{"name": "full"}], "samples": 4, "batch_size": 3, "length": 256}
    (config,) = job.expand(table, where="t [kv]", overrides=Overrides())
    metrics = job.run(config, RunContext(device=CPU, progress=False, log=quiet))
    assert seen["batch_size"] == 3 and seen["n_samples"] == 4 and metrics["policies"] == {}


@pytest.mark.parametrize(
    "key,value,word",
    [
        ("samples", "3", "samples"),
        ("seed", -1, "seed"),
        ("batch_size", 0, "batch_size"),
        ("mode", "x", "mode"),
    ],
)
def test_kv_niah_bad_values_name_the_key(key: str, value, word: str) -> None:
    from memlab.bench.jobs import build_job

    table = {"job": "kv_niah", "policies": [{"name": "full"}], key: value}
    with pytest.raises(ValueError, match=word):
        build_job("kv_niah").expand(table, where="t [kv]", overrides=Overrides(max_examples=2))


def test_report_into_a_file_path_is_a_value_error(tmp_path, capsys) -> None:
    store_path = tmp_path / "s.sqlite"
    Store(store_path).close()
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(ValueError, match="taken"):
            write_report(store_path, out)
        assert main(["report", "--store", str(store_path), "--out", str(out)]) == 2
        assert "cannot be created" in capsys.readouterr().out
    assert a_file.read_text() == "x"
