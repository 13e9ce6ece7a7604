"""`moetune run` end to end on the interpreter: tables, resume, bad input, the correctness gate."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.tables import read_table
from moetune.cli.run import default_compile_workers

TINY = ["--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32"]
TABLE = "E=4,N=32,K=64,topk=2,dtype=fp16.json"


def run_cli(*args: str) -> int:
    return main(["run", *args, "--no-progress", "--compile-workers", "0"])


def load_trials(journal: Path) -> dict[str, list]:
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return {summary.study_name: optuna.load_study(study_name=summary.study_name, storage=storage).trials
            for summary in optuna.get_all_study_summaries(storage)}


def measured_configs(trials) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials if t.user_attrs.get("status") == "measured"]


def test_tiny_tune_writes_a_valid_table(tmp_path, capsys):
    assert run_cli(*TINY, "--batch-sizes", "1,8", "--trials", "3", "--out-dir", str(tmp_path)) == 0
    table = read_table(tmp_path / "cpu" / TABLE)  # validates the schema
    assert sorted(table["batch_sizes"]) == [1, 8]
    for entry in table["batch_sizes"].values():
        assert set(entry) == {"unfused", "fused", "winner"}
        assert entry["winner"] == min(("unfused", "fused"), key=lambda v: entry[v]["layer_us"])
    assert table["device"]["key"] == "cpu" and table["shape"]["dtype"] == "fp16"
    assert table["search"]["trials"] == 3
    out = capsys.readouterr().out
    assert "mean nothing" in out  # interpreter timings are labelled as such
    assert "winner" in out and "speedup" in out  # the summary table
    studies = load_trials(tmp_path / "cpu" / "moetune-studies.journal")
    assert len(studies) == 2 * 3  # (batch size) x (gemm1, gemm2_unfused, gemm2_fused)
    for trials in studies.values():
        assert len(measured_configs(trials)) == 3


def test_rerun_adds_batch_sizes_to_the_table_and_repeats_no_trial(tmp_path):
    assert run_cli(*TINY, "--batch-sizes", "1", "--trials", "2", "--out-dir", str(tmp_path)) == 0
    journal = tmp_path / "cpu" / "moetune-studies.journal"
    before = {name: measured_configs(trials) for name, trials in load_trials(journal).items()}
    assert run_cli(*TINY, "--batch-sizes", "1,4", "--trials", "2", "--variants", "unfused,fused",
                   "--out-dir", str(tmp_path)) == 0
    after = load_trials(journal)
    for name, configs in before.items():
        assert measured_configs(after[name]) == configs  # finished studies were not run again
    assert sorted(read_table(tmp_path / "cpu" / TABLE)["batch_sizes"]) == [1, 4]


def test_the_command_ends_with_its_exit_code_and_all_its_output(tmp_path):
    """It leaves without the interpreter's teardown: what it printed into a pipe still arrives."""
    command = [sys.executable, "-m", "moetune", "run", *TINY, "--batch-sizes", "4", "--trials", "2",
               "--variants", "unfused", "--out-dir", str(tmp_path), "--no-progress", "--compile-workers", "0"]
    # Buffered output, as Python buffers a pipe unless told otherwise.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0].startswith("tuning ")
    assert result.stdout.splitlines()[-1] == f"wrote {tmp_path / 'cpu' / TABLE}"
    assert sorted(read_table(tmp_path / "cpu" / TABLE)["batch_sizes"]) == [4]
    refused = subprocess.run([*command[:4], "--E", "4", "--topk", "9"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2
    assert refused.stderr == "moetune: error: --E (4) must be at least --topk (9)\n"


def test_killed_run_resumes_without_repeating_finished_trials(tmp_path):
    command = [sys.executable, "-m", "moetune", "run", *TINY, "--batch-sizes", "4", "--trials", "6",
               "--out-dir", str(tmp_path), "--no-progress", "--compile-workers", "0"]
    env = dict(os.environ, TRITON_INTERPRET="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "cpu" / "moetune-studies.journal"
    deadline = time.monotonic() + 120
    finished = 0
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        if journal.exists():
            finished = sum(len(measured_configs(t)) for t in load_trials(journal).values())
            if finished >= 4:
                break
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = {name: measured_configs(trials) for name, trials in load_trials(journal).items()}
    assert sum(map(len, first.values())) >= 4
    assert not (tmp_path / "cpu" / TABLE).exists() or read_table(tmp_path / "cpu" / TABLE)

    assert run_cli(*TINY, "--batch-sizes", "4", "--trials", "6", "--out-dir", str(tmp_path)) == 0
    second = load_trials(journal)
    for name, configs in first.items():
        resumed = measured_configs(second[name])
        assert resumed[:len(configs)] == configs  # what finished is kept, in order
        assert len(resumed) == 6  # and topped up to the budget, not re-run from scratch
        assert len(set(resumed)) == len(resumed)  # no config measured twice
    assert sorted(read_table(tmp_path / "cpu" / TABLE)["batch_sizes"]) == [4]


@pytest.mark.parametrize("args,words", [
    (["--model", "NoSuchModel-7B"], "NoSuchModel-7B"),
    (["--E", "2", "--topk", "4", "--hidden", "64", "--intermediate", "32"], "--topk (4)"),
    (["--E", "4", "--topk", "2", "--hidden", "0", "--intermediate", "32"], "--hidden"),
    (["--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "-32"], "--intermediate"),
    (["--E", "4", "--topk", "3"], "--hidden and --intermediate"),
    ([*TINY, "--batch-sizes", "1,two"], "two"),
    ([*TINY, "--batch-sizes", "0"], "0"),
    ([*TINY, "--gpu", "H100"], "H100"),
    ([*TINY, "--trials", "0"], "--trials"),
    ([*TINY, "--variants", "atomic"], "atomic"),
    ([*TINY, "--storage", "sqlite:////no/such/folder/studies.db"], "--storage"),
    ([*TINY, "--storage", "postgresql://tuner@127.0.0.1:1/studies"], "--storage"),
    ([*TINY, "--space", "/no/such/space.yaml"], "space.yaml"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, words):
    out_dir = tmp_path / "tables"
    assert main(["run", *args, "--out-dir", str(out_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moetune: error:")
    assert words in err
    assert not out_dir.exists()


def test_unwritable_out_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["run", *TINY, "--out-dir", str(blocker / "tables"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out-dir" in err and err.count("\n") == 0
    assert blocker.read_text() == "not a folder"


def test_presets_matching_e_and_topk_are_named(tmp_path, capsys, monkeypatch):
    # E 64 / top-k 8 means two presets; stop before tuning to keep the test short.
    import moetune.tune.run as tune

    seen = {}

    def fake_tune(settings, log=print, compiler=None):
        seen["shapes"] = [shape.name for shape in settings.shapes]
        return []

    monkeypatch.setattr(tune, "tune", fake_tune)
    assert main(["run", "--E", "64", "--topk", "8", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    assert sorted(seen["shapes"]) == ["OLMoE-1B-7B", "Qwen2-57B-A14B"]
    assert "OLMoE-1B-7B" in capsys.readouterr().out


def test_a_config_computing_wrong_results_is_rejected(tmp_path, monkeypatch):
    """A config whose GEMM 2 output is off never wins, and its trial says why."""
    import moetune.tune.inputs as bench_layer
    import moetune.layer as layer

    real = layer.grouped_gemm

    def corrupting(a, weights, out, aligned, config, **kwargs):
        result = real(a, weights, out, aligned, config, **kwargs)
        if config["BLOCK_SIZE_N"] == 32 and kwargs.get("topk_weights") is not None:
            out.mul_(1.5)  # a GEMM 2 that computes the wrong thing
        return result

    monkeypatch.setattr(layer, "grouped_gemm", corrupting)
    monkeypatch.setattr(bench_layer, "grouped_gemm", corrupting)
    space = tmp_path / "space.yaml"
    space.write_text("BLOCK_SIZE_M: [16]\nBLOCK_SIZE_N: [32, 64]\nBLOCK_SIZE_K: [32]\nGROUP_SIZE_M: [1]\n"
                     "num_warps: [4]\nnum_stages: [2]\n")
    assert run_cli(*TINY, "--batch-sizes", "4", "--trials", "2", "--space", str(space),
                   "--out-dir", str(tmp_path)) == 0
    table = read_table(tmp_path / "cpu" / TABLE)
    for variant in ("unfused", "fused"):
        assert table["batch_sizes"][4][variant]["gemm2"]["BLOCK_SIZE_N"] == 64
    trials = load_trials(tmp_path / "cpu" / "moetune-studies.journal")
    rejected = [t for name, ts in trials.items() if "gemm2" in name for t in ts
                if t.user_attrs.get("status") == "wrong_result"]
    assert len(rejected) == 2 and all(t.params["BLOCK_SIZE_N"] == 32 for t in rejected)
    assert all("relative error" in t.user_attrs["reason"] for t in rejected)
    json.dumps([t.user_attrs for t in rejected])  # reasons are plain data


@pytest.mark.parametrize("cores, gpus, expected", [
    (16, 1, 16),   # one H200 host: a process per core (the tuner runs before them)
    (32, 1, 16),   # at most 16 for one GPU
    (32, 2, 16),   # two GPUs share the cores
    (16, 2, 8),
    (2, 1, 2),
    (1, 1, 0),     # one core: compile inline
    (2, 4, 1),     # more GPUs than cores: still one each
])
def test_default_compile_workers(cores, gpus, expected):
    assert default_compile_workers(cores, gpus) == expected
