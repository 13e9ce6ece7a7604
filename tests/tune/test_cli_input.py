"""`moetune run` and `collect` check every input before any work: a bad one is one line on
stderr naming it, exit code 2, and nothing written (no folder, no journal, no table)."""

import os
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.cli.run import default_compile_workers
from tests.tune.conftest import QUIET, TINY

BIG = ["--E", "8", "--topk", "2", "--hidden", "65536", "--intermediate", "65536"]
HUGE = ["--E", "8", "--topk", "2", "--hidden", "1000000000", "--intermediate", "1000000000"]

# (command and its arguments but --out-dir, the words the error must hold); "{tmp}" is a
# folder of the test's, where its bad files lie.
BAD_INVOCATIONS = [
    (["run", "--model", "NoSuchModel-7B"], "'NoSuchModel-7B'"),
    (["run", "--E", "2", "--topk", "4", "--hidden", "64", "--intermediate", "32"], "--topk (4)"),
    (["run", "--E", "4", "--topk", "2", "--hidden", "0", "--intermediate", "32"], "--hidden"),
    (["run", "--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "-32"], "--intermediate"),
    (["run", "--E", "4", "--topk", "3"], "--hidden and --intermediate"),
    (["run", "--E", "8", "--topk", "2", "--hidden", "1e9", "--intermediate", "1e9"], "'1e9'"),
    (["run", *HUGE], "hidden=1000000000"),
    (["run", *BIG], "hidden=65536, intermediate=65536"),
    (["run", *BIG, "--batch-sizes", "1"], "GiB"),
    (["run", *TINY, "--batch-sizes", "1,two"], "'two'"),
    (["run", *TINY, "--batch-sizes", "0"], "'0'"),
    (["run", *TINY, "--batch-sizes", "100000000"], "100000000"),
    (["run", *TINY, "--gpu", "H100"], "'H100'"),
    (["run", *TINY, "--trials", "0"], "--trials"),
    (["run", *TINY, "--variants", "atomic"], "'atomic'"),
    (["run", *TINY, "--dtype", "bf16"], "--dtype bf16"),
    (["run", *TINY, "--time-budget", "0"], "--time-budget"),
    (["run", *TINY, "--heartbeat", "0"], "--heartbeat"),
    (["run", *TINY, "--compile-workers", "-1"], "-1"),
    (["run", *TINY, "--compile-workers", "100000"], "100000"),
    (["run", *TINY, "--devices", "x"], "'x'"),
    (["run", *TINY, "--devices", "0,0"], "twice"),
    (["run", *TINY, "--devices", ""], "--devices"),
    (["run", *TINY, "--storage", "sqlite:////no/such/folder/studies.db"], "/no/such/folder"),
    (["run", *TINY, "--storage", "postgresql://tuner@127.0.0.1:1/studies"], "127.0.0.1:1"),
    (["run", *TINY, "--storage", "/no/such/folder/studies.journal"], "/no/such/folder"),
    (["run", *TINY, "--storage", "/proc/studies.journal"], "'/proc'"),
    (["run", *TINY, "--storage", "sqlite:////proc/studies.db"], "'/proc'"),
    (["run", *TINY, "--space", "/no/such/space.yaml"], "/no/such/space.yaml"),
    (["run", *TINY, "--space", "{tmp}/broken.yaml"], "broken.yaml"),
    (["run", *TINY, "--space", "{tmp}/unknown_key.yaml"], "BLOCK_SIZE_Q"),
    (["run", *TINY, "--baseline-configs", "/no/such/folder"], "/no/such/folder"),
    (["run", *TINY, "--out-dir", "/proc/x"], "/proc/x"),
    (["run", *TINY, "--out-dir", "{tmp}/a-file/tables"], "a-file"),
    (["collect", *TINY, "--batch-sizes", "1"], "holds no studies"),
    (["collect", *TINY, "--batch-sizes", "1", "--storage", "{tmp}/no-studies.journal"], "no-studies.journal"),
    (["collect", *TINY, "--out-dir", "/proc/x"], "/proc/x"),
    (["collect", *TINY, "--batch-sizes", "100000000"], "100000000"),
    (["collect", *BIG], "hidden=65536"),
]


def listing(folder: Path) -> dict:
    """Every path under `folder`, with a file's size and modification time (a folder's
    changes when the output check creates and removes its probe there)."""
    return {str(path): None if path.is_dir() else (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("args, words", BAD_INVOCATIONS, ids=lambda value: " ".join(value) if isinstance(value, list)
                         else None)
def test_a_bad_invocation_is_one_line_exit_2_and_writes_nothing(args, words, tmp_path, monkeypatch, capsys):
    files = tmp_path / "files"
    files.mkdir()
    (files / "broken.yaml").write_text("num_warps: [4\n")
    (files / "unknown_key.yaml").write_text("BLOCK_SIZE_Q: [16]\n")
    (files / "a-file").write_text("not a folder")
    cwd = tmp_path / "cwd"  # where the default --out-dir, ./tuned_configs, would go
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = [arg.replace("{tmp}", str(files)) for arg in args]
    extra = ["--no-progress"] if args[0] == "run" else []
    before = listing(tmp_path)
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetune: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert words in err
    assert listing(tmp_path) == before  # no folder, no journal, no table, here or in ./tuned_configs


def test_presets_matching_e_and_topk_are_named(tmp_path, capsys, monkeypatch):
    # E 64 / top-k 8 means two presets; stop before tuning to keep the test short.
    import moetune.tune as tune

    seen = {}

    def fake_tune(settings, log=print, compiler=None):
        seen["shapes"] = [shape.name for shape in settings.shapes]
        return []

    monkeypatch.setattr(tune, "tune", fake_tune)
    assert main(["run", "--E", "64", "--topk", "8", "--out-dir", str(tmp_path), *QUIET]) == 0
    assert sorted(seen["shapes"]) == ["OLMoE-1B-7B", "Qwen2-57B-A14B"]
    assert "OLMoE-1B-7B" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


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
