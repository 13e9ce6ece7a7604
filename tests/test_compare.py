"""`moetune compare` end to end under the interpreter, and the prefill script's --help.

One comparison with every contender (a tuned table, a baseline folder) runs once for the
module; the tests read its files and its report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetune import cli, loader, table_paths
from moetune.baseline_configs import find_anchor, packaged_baselines, read_anchors
from moetune.device import local_device
from moetune.reference import TOLERANCE
from moetune.tables import new_table, table_path, write_table

# One test worker runs the whole module: the module's compared tables are built once.
pytestmark = pytest.mark.xdist_group("compare")

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(E=4, N=16, K=32, topk=2)
TINY = ["compare", "--E", "4", "--topk", "2", "--hidden", "32", "--intermediate", "16", "--dtype", "fp16"]
STEM = "E4_N16_K32_topk2_fp16"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTENDERS = ("unfused", "fused", "dispatcher", "default", "baseline")


def config(m=16, n=64, k=128, group=1, warps=4, stages=3) -> dict:
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": group,
            "num_warps": warps, "num_stages": stages}


def compact(cfg: dict) -> str:
    return (f"M{cfg['BLOCK_SIZE_M']} N{cfg['BLOCK_SIZE_N']} K{cfg['BLOCK_SIZE_K']} G{cfg['GROUP_SIZE_M']} "
            f"w{cfg['num_warps']} s{cfg['num_stages']}")


# The tuned table: M=1 unfused only; M=2 both variants, fused the winner.
UNFUSED_AT_1, UNFUSED_AT_2, FUSED_AT_2 = config(n=32), config(n=16, k=32), config(n=32, k=16, stages=2)
BASELINE_SMALL, BASELINE_LARGE = config(n=32, k=32, stages=2), config(n=16, k=16, stages=2)
# Anchor figures beside the baseline's configs: this shape at M=1 (none at M=2), and a
# neighbour shape whose figures must not be taken.
ANCHOR_AT_1 = 1234.5
ANCHORS = {"device": "cpu", "source": "figures of a test", "shapes": [
    {"E": 4, "N": 16, "K": 32, "topk": 2, "dtype": "fp16", "us": {"1": ANCHOR_AT_1, "64": 5.0}},
    {"E": 4, "N": 16, "K": 64, "topk": 2, "dtype": "fp16", "us": {"1": 7.0, "2": 7.0}}]}
ANCHOR_COLUMNS = ["anchor_us", "dispatcher_over_anchor"]


@contextlib.contextmanager
def isolated_loader(monkeypatch, root: Path):
    """No tables but the test's own: no environment settings, an empty packaged folder."""
    for name in (table_paths.ENV_CONFIG_DIR, loader.ENV_STRICT, loader.ENV_DETERMINISTIC):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(table_paths, "PACKAGED_DIR", root / "packaged")
    loader.clear_cache()
    yield
    loader.clear_cache()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    with isolated_loader(monkeypatch, tmp_path):
        yield


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """(out folder, table path, baseline file, stdout, stderr) of one full comparison."""
    root = tmp_path_factory.mktemp("compared")
    table = new_table(local_device(), **SHAPE, dtype="fp16", search={})
    timed = {"gemm1_us": 1.0, "gemm2_us": 1.0, "layer_us": 2.0}
    table["batch_sizes"] = {
        1: {"unfused": {"gemm1": UNFUSED_AT_1, "gemm2": UNFUSED_AT_1, **timed}, "winner": "unfused"},
        2: {"unfused": {"gemm1": UNFUSED_AT_2, "gemm2": UNFUSED_AT_2, **timed},
            "fused": {"gemm1": FUSED_AT_2, "gemm2": FUSED_AT_2, **timed}, "winner": "fused"},
    }
    path = table_path(root / "tables", local_device().key, **SHAPE, dtype="fp16")
    write_table(path, table)
    baseline_file = root / "baseline" / "E=4,N=16,device_name=cpu.json"
    baseline_file.parent.mkdir()
    baseline_file.write_text(json.dumps({"1": BASELINE_SMALL, "64": BASELINE_LARGE}))
    (baseline_file.parent / "anchors.json").write_text(json.dumps(ANCHORS))
    out = root / "results"
    previous_umask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, isolated_loader(monkeypatch, root):
            monkeypatch.setenv(table_paths.ENV_CONFIG_DIR, str(root / "tables"))
            code, stdout, stderr = run_cli([*TINY, "--batch-sizes", "1,2", "--baseline-configs",
                                            baseline_file.parent, "--out", out])
    finally:
        os.umask(previous_umask)
    assert code == 0, stderr
    return out, path, baseline_file, stdout, stderr


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_writes_csv_json_and_plots(compared):
    out, _, _, _, stderr = compared
    assert stderr == ""
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [f"{STEM}.csv", f"{STEM}.json", f"{STEM}_time.png", f"{STEM}_speedup.png"])
    for plot in ("time", "speedup"):
        assert (out / f"{STEM}_{plot}.png").read_bytes().startswith(PNG_MAGIC)


def test_files_are_readable_by_all_under_umask_022(compared):
    assert {oct(path.stat().st_mode & 0o777) for path in compared[0].iterdir()} == {oct(0o644)}


def test_csv_has_every_contender_checked_and_timed(compared):
    out, _, baseline_file, _, _ = compared
    columns, rows = read_csv(out / f"{STEM}.csv")
    expected = ["M", "experts_hit", "roofline_us", "fused_speedup", "unfused_roofline_ratio", "fused_roofline_ratio",
                "winner", "dispatcher_pick"]
    expected += [f"{name}_{what}" for name in CONTENDERS for what in ("us", "rel_error", "variant", "source")]
    assert set(expected) <= set(columns)
    assert [int(row["M"]) for row in rows] == [1, 2]
    for row in rows:
        for name in CONTENDERS:
            error = float(row[f"{name}_rel_error"])
            assert math.isfinite(error) and error <= TOLERANCE[torch.float16], (name, error)
            assert float(row[f"{name}_us"]) > 0
            assert float(row[f"{name}_rounds_us"]) == pytest.approx(float(row[f"{name}_us"]), rel=1e-3)  # one round
        unfused, fused = float(row["unfused_us"]), float(row["fused_us"])
        assert float(row["fused_speedup"]) == pytest.approx(unfused / fused)
        assert row["winner"] == ("fused" if fused < unfused else "unfused")
        assert row["unfused_variant"] == "unfused" and row["fused_variant"] == "fused"
        assert row["default_source"] == "default heuristic" and row["default_variant"] == "unfused"
        assert row["baseline_source"] == str(baseline_file) and row["baseline_variant"] == "unfused"
        assert row["baseline_gemm1"] == compact(BASELINE_SMALL)  # 1 and 2 are both nearest to key 1


def test_dispatcher_runs_the_tuned_table(compared):
    out, path, _, _, _ = compared
    _, rows = read_csv(out / f"{STEM}.csv")
    at = {int(row["M"]): row for row in rows}
    assert at[2]["dispatcher_pick"] == "fused" and at[2]["dispatcher_variant"] == "fused"
    assert at[2]["dispatcher_gemm1"] == compact(FUSED_AT_2) and at[2]["dispatcher_table_M"] == "2"
    assert at[1]["dispatcher_pick"] == "unfused" and at[1]["dispatcher_gemm1"] == compact(UNFUSED_AT_1)
    assert at[1]["fused_gemm1"] == compact(FUSED_AT_2)  # the nearest batch size that has a fused entry
    assert at[1]["dispatcher_source"] == at[2]["dispatcher_source"] == str(path)


def test_json_records_the_run(compared):
    out, path, baseline_file, _, _ = compared
    document = json.loads((out / f"{STEM}.json").read_text())
    meta = document["metadata"]
    assert {"device", "versions", "command_line", "date", "config_sources", "timing"} <= set(meta)
    assert set(meta["versions"]) == {"torch", "triton", "moetune"}
    assert meta["device"]["key"] == "cpu"
    assert meta["config_sources"]["baseline"] == [str(baseline_file)]
    assert meta["config_sources"]["dispatcher"] == [str(path)]
    assert meta["command_line"].startswith("moetune compare ")
    assert [row["M"] for row in document["rows"]] == [1, 2]
    assert set(document["rows"][0]["contenders"]) == set(CONTENDERS)


def test_report_fits_the_terminal(compared):
    printed = compared[3]
    assert "mean nothing" in printed
    table_lines = [line for line in printed.splitlines() if line.split() and line.split()[0] in ("M", "1", "2")]
    assert len(table_lines) == 6  # the contenders' table and the anchor's
    # Lines naming a file are as long as the test's temporary folder; the rest fit 120 columns.
    assert all(len(line) <= 120 for line in printed.splitlines() if "/" not in line)


def test_anchor_figures_beside_the_dispatcher_at_their_batch_sizes(compared):
    out, _, baseline_file, printed, _ = compared
    columns, rows = read_csv(out / f"{STEM}.csv")
    assert columns[-2:] == ANCHOR_COLUMNS
    at = {int(row["M"]): row for row in rows}
    assert float(at[1]["anchor_us"]) == ANCHOR_AT_1
    assert float(at[1]["dispatcher_over_anchor"]) == pytest.approx(float(at[1]["dispatcher_us"]) / ANCHOR_AT_1)
    assert at[2]["anchor_us"] == at[2]["dispatcher_over_anchor"] == ""  # no figure at M=2
    document = json.loads((out / f"{STEM}.json").read_text())
    assert document["metadata"]["anchor"] == {"source": "figures of a test",
                                              "file": str(baseline_file.parent / "anchors.json")}
    first, second = document["rows"]
    assert first["anchor_us"] == ANCHOR_AT_1
    assert first["dispatcher_over_anchor"] == pytest.approx(first["contenders"]["dispatcher"]["us"] / ANCHOR_AT_1)
    assert second["anchor_us"] is None and second["dispatcher_over_anchor"] is None
    lines = printed.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("anchor: figures of a test")))
    assert lines[start + 1].split() == ["M", "disp", "us", "anchor", "us", "disp/anchor"]
    assert lines[start + 2].split()[:3] == ["1", f"{float(at[1]['dispatcher_us']):.1f}", f"{ANCHOR_AT_1:.1f}"]
    assert lines[start + 3].split()[2:] == ["-", "-"]


def test_without_matplotlib_a_note_and_the_rest_written_with_its_rounds(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "results"

    code, stdout, stderr = run_cli([*TINY, "--batch-sizes", "1", "--rounds", "2", "--out", out])

    assert code == 0
    assert stderr.splitlines() == [
        "moetune: note: plots need matplotlib: pip install 'moetune[plots]'; writing the CSV and JSON files only"]
    assert sorted(path.name for path in out.iterdir()) == [f"{STEM}.csv", f"{STEM}.json"]
    _, rows = read_csv(out / f"{STEM}.csv")
    # No table for this shape: every dispatcher lookup falls back, and the report says so.
    assert rows[0]["dispatcher_source"] == "default heuristic" and rows[0]["dispatcher_variant"] == "unfused"
    assert "no tuned table" in stdout
    document = json.loads((out / f"{STEM}.json").read_text())
    # No anchor figures for this device and shape (the packaged ones are the H200's): no anchor columns.
    assert not set(ANCHOR_COLUMNS) & set(rows[0]) and "anchor" not in document["metadata"]
    assert "anchor" not in stdout
    assert "--rounds 2" in document["metadata"]["command_line"]  # the command reproduces the rounds too
    for name in ("unfused", "fused", "dispatcher", "default"):
        rounds = [float(t) for t in rows[0][f"{name}_rounds_us"].split()]
        assert len(rounds) == 2 and all(t > 0 for t in rounds)
        assert float(rows[0][f"{name}_us"]) == pytest.approx(statistics.median(rounds), rel=1e-3)
        assert document["rows"][0]["contenders"][name]["rounds_us"] == pytest.approx(rounds, rel=1e-3)


def test_a_folder_without_anchor_figures_falls_back_to_the_packaged_ones(tmp_path):
    qwen3 = {"E": 128, "N": 768, "K": 2048, "topk": 8}
    packaged = find_anchor(**qwen3, dtype="bf16", device_key="NVIDIA H200", folder=tmp_path)
    assert packaged is not None and packaged.path.parent == packaged_baselines()["sglang-vllm-h200"]
    assert list(packaged.times_us) == [1, 4, 16, 64, 256, 1024, 4096, 16384]
    assert find_anchor(**qwen3, dtype="fp16", device_key="NVIDIA_H200") is None
    assert find_anchor(**qwen3, dtype="bf16", device_key="NVIDIA_H100_80GB_HBM3") is None


@pytest.mark.parametrize("key", ["²", "٣", "0", "x"])
def test_an_anchor_batch_size_that_is_not_ascii_digits_is_refused_naming_the_file(tmp_path, key):
    path = tmp_path / "anchors.json"
    path.write_text(json.dumps({**ANCHORS, "shapes": [{**ANCHORS["shapes"][0], "us": {key: 1.0}}]}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: shapes\[0\].us key must be a batch size"):
        read_anchors(path)


def bad_invocations(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one line must name)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = str(tmp_path / "out")
    bad_anchors = tmp_path / "bad_anchors"
    bad_anchors.mkdir()
    (bad_anchors / "anchors.json").write_text(json.dumps(
        {**ANCHORS, "shapes": [{**ANCHORS["shapes"][0], "us": {"1": -3}}]}))
    shape = ["--E", "4", "--topk", "2", "--hidden", "32", "--intermediate", "16", "--dtype", "fp16"]
    return [
        (["--model", "No-Such-Model", "--dtype", "fp16", "--out", out], "No-Such-Model"),
        (["--E", "2", "--topk", "4", "--hidden", "32", "--intermediate", "16", "--dtype", "fp16", "--out", out],
         "--E (2) must be at least --topk (4)"),
        ([*shape, "--batch-sizes", "1,x", "--out", out], "'x'"),
        ([*shape, "--batch-sizes", "0", "--out", out], "'0'"),
        ([*shape, "--gpu", "No-Such-GPU", "--out", out], "No-Such-GPU"),
        ([*shape, "--out", str(a_file / "out")], "is not a folder"),
        ([*shape, "--out", str(a_file)], f"--out {str(a_file)!r}"),
        ([*shape, "--out", "/proc/moetune-compare"], "--out '/proc/moetune-compare' is not writable"),
        ([*shape, "--baseline-configs", str(tmp_path / "missing"), "--out", out], "missing"),
        ([*shape, "--rounds", "0", "--out", out], "--rounds must be at least 1, got 0"),
        ([*shape[:-2], "--dtype", "bf16", "--out", out], "bf16"),  # no bf16 atomic add in the interpreter
        ([*shape, "--baseline-configs", str(bad_anchors), "--out", out],
         f"{bad_anchors / 'anchors.json'}: shapes[0].us['1'] must be a positive number of µs, got -3"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    argv, words = bad_invocations(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))

    code, stdout, stderr = run_cli(["compare", *argv])

    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("moetune: error: ")
    assert words in stderr
    assert stdout == ""
    assert sorted(tmp_path.rglob("*")) == before
    assert not Path("/proc/moetune-compare").exists()


def test_bench_prefill_help_runs_without_a_gpu():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_prefill.py"), "--help"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "--lengths" in result.stdout and "--layers" in result.stdout
