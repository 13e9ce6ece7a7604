"""`moetune compare` end to end under the interpreter, and the prefill script's --help."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetune import cli, loader
from moetune.device import local_device
from moetune.reference import TOLERANCE
from moetune.tables import new_table, table_path, write_table

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(E=4, N=16, K=32, topk=2)
TINY = ["compare", "--E", "4", "--topk", "2", "--hidden", "32", "--intermediate", "16", "--dtype", "fp16",
        "--batch-sizes", "1,4"]
STEM = "E4_N16_K32_topk2_fp16"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTENDERS = ("unfused", "fused", "dispatcher", "default", "baseline")


def config(m=16, n=64, k=128, group=1, warps=4, stages=3) -> dict:
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": group,
            "num_warps": warps, "num_stages": stages}


def compact(cfg: dict) -> str:
    return (f"M{cfg['BLOCK_SIZE_M']} N{cfg['BLOCK_SIZE_N']} K{cfg['BLOCK_SIZE_K']} G{cfg['GROUP_SIZE_M']} "
            f"w{cfg['num_warps']} s{cfg['num_stages']}")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No tables but the test's own: no environment settings, an empty packaged folder."""
    for name in (loader.ENV_CONFIG_DIR, loader.ENV_STRICT, loader.ENV_DETERMINISTIC):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(loader, "PACKAGED_DIR", tmp_path / "packaged")
    loader.clear_cache()
    yield
    loader.clear_cache()


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_end_to_end_writes_csv_json_and_plots(tmp_path, capsys):
    baseline_dir = tmp_path / "baseline"
    baseline_dir.mkdir()
    baseline_small, baseline_large = config(n=32, k=32, stages=2), config(n=16, k=16, stages=2)
    baseline_file = baseline_dir / "E=4,N=16,device_name=cpu.json"
    baseline_file.write_text(json.dumps({"1": baseline_small, "64": baseline_large}))
    out = tmp_path / "results"

    code = cli.main([*TINY, "--baseline-configs", str(baseline_dir), "--out", str(out)])
    printed = capsys.readouterr().out

    assert code == 0
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [f"{STEM}.csv", f"{STEM}.json", f"{STEM}_time.png", f"{STEM}_speedup.png"])
    for plot in ("time", "speedup"):
        assert (out / f"{STEM}_{plot}.png").read_bytes().startswith(PNG_MAGIC)

    columns, rows = read_csv(out / f"{STEM}.csv")
    expected = ["M", "experts_hit", "roofline_us", "fused_speedup", "unfused_roofline_ratio", "fused_roofline_ratio",
                "winner", "dispatcher_pick"]
    expected += [f"{name}_{what}" for name in CONTENDERS for what in ("us", "rel_error", "variant", "source")]
    assert set(expected) <= set(columns)
    assert [int(row["M"]) for row in rows] == [1, 4]
    for row in rows:
        for name in CONTENDERS:
            error = float(row[f"{name}_rel_error"])
            assert math.isfinite(error) and error <= TOLERANCE[torch.float16], (name, error)
            assert float(row[f"{name}_us"]) > 0
            assert [float(t) for t in row[f"{name}_rounds_us"].split()] == pytest.approx([float(row[f"{name}_us"])],
                                                                                        rel=1e-3)  # one round
        unfused, fused = float(row["unfused_us"]), float(row["fused_us"])
        assert float(row["fused_speedup"]) == pytest.approx(unfused / fused)
        assert row["winner"] == ("fused" if fused < unfused else "unfused")
        # No table for this shape: every dispatcher lookup falls back, and says so.
        assert row["unfused_variant"] == "unfused" and row["fused_variant"] == "fused"
        assert row["dispatcher_source"] == "default heuristic" and row["dispatcher_variant"] == "unfused"
        assert row["baseline_source"] == str(baseline_file) and row["baseline_variant"] == "unfused"
        assert row["baseline_gemm1"] == compact(baseline_small)  # 1 and 4 are both nearest to key 1

    document = json.loads((out / f"{STEM}.json").read_text())
    meta = document["metadata"]
    assert {"device", "versions", "command_line", "date", "config_sources"} <= set(meta)
    assert set(meta["versions"]) == {"torch", "triton", "moetune"}
    assert meta["device"]["key"] == "cpu"
    assert meta["config_sources"]["baseline"] == [str(baseline_file)]
    assert meta["command_line"].startswith("moetune compare ")
    assert [row["M"] for row in document["rows"]] == [1, 4]
    assert set(document["rows"][0]["contenders"]) == set(CONTENDERS)

    assert "mean nothing" in printed
    assert "no tuned table" in printed
    table_lines = [line for line in printed.splitlines() if line.split() and line.split()[0] in ("M", "1", "4")]
    assert len(table_lines) == 3
    assert all(len(line) <= 120 for line in table_lines)


def test_dispatcher_uses_the_tuned_table(tmp_path, monkeypatch):
    unfused_at_1, unfused_at_4, fused_at_4 = config(n=32), config(n=16, k=32), config(n=32, k=16, stages=2)
    table = new_table(local_device(), **SHAPE, dtype="fp16", search={})
    timed = {"gemm1_us": 1.0, "gemm2_us": 1.0, "layer_us": 2.0}
    table["batch_sizes"] = {
        1: {"unfused": {"gemm1": unfused_at_1, "gemm2": unfused_at_1, **timed}, "winner": "unfused"},
        4: {"unfused": {"gemm1": unfused_at_4, "gemm2": unfused_at_4, **timed},
            "fused": {"gemm1": fused_at_4, "gemm2": fused_at_4, **timed}, "winner": "fused"},
    }
    tables = tmp_path / "tables"
    path = table_path(tables, local_device().key, **SHAPE, dtype="fp16")
    write_table(path, table)
    monkeypatch.setenv(loader.ENV_CONFIG_DIR, str(tables))
    loader.clear_cache()
    out = tmp_path / "results"

    assert cli.main([*TINY, "--out", str(out)]) == 0

    _, rows = read_csv(out / f"{STEM}.csv")
    at = {int(row["M"]): row for row in rows}
    assert at[4]["dispatcher_pick"] == "fused" and at[4]["dispatcher_variant"] == "fused"
    assert at[4]["dispatcher_gemm1"] == compact(fused_at_4) and at[4]["dispatcher_table_M"] == "4"
    assert at[1]["dispatcher_pick"] == "unfused" and at[1]["dispatcher_gemm1"] == compact(unfused_at_1)
    assert at[1]["fused_gemm1"] == compact(fused_at_4)  # the nearest batch size that has a fused entry
    for M in (1, 4):
        assert at[M]["dispatcher_source"] == str(path)
        assert at[M]["default_source"] == "default heuristic"
    document = json.loads((out / f"{STEM}.json").read_text())
    assert document["metadata"]["config_sources"]["dispatcher"] == [str(path)]


def _bad_inputs(tmp_path: Path) -> list[list[str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = str(tmp_path / "out")
    shape = ["--E", "4", "--topk", "2", "--hidden", "32", "--intermediate", "16"]
    return [
        ["compare", "--model", "No-Such-Model", "--dtype", "fp16", "--out", out],
        ["compare", "--E", "2", "--topk", "4", "--hidden", "32", "--intermediate", "16", "--dtype", "fp16", "--out", out],
        ["compare", *shape, "--dtype", "fp16", "--batch-sizes", "1,x", "--out", out],
        ["compare", *shape, "--dtype", "fp16", "--batch-sizes", "0", "--out", out],
        ["compare", *shape, "--dtype", "fp16", "--gpu", "No-Such-GPU", "--out", out],
        ["compare", *shape, "--dtype", "fp16", "--out", str(a_file / "out")],
        ["compare", *shape, "--dtype", "fp16", "--baseline-configs", str(tmp_path / "missing"), "--out", out],
        ["compare", *shape, "--dtype", "bf16", "--out", out],  # no bf16 atomic add in the interpreter
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    argv = _bad_inputs(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))

    code = cli.main(argv)

    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("moetune: error: ")
    assert captured.out == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_bad_input_messages_name_the_problem(tmp_path, capsys):
    expected = ["No-Such-Model", "--E (2) must be at least --topk (4)", "'x'", "'0'", "No-Such-GPU",
                "is not a folder", "--baseline-configs", "bf16"]
    for argv, words in zip(_bad_inputs(tmp_path), expected):
        assert cli.main(argv) == 2
        assert words in capsys.readouterr().err


def test_unwritable_out_names_the_out_flag(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert cli.main([*TINY, "--out", str(a_file)]) == 2
    assert "--out " in capsys.readouterr().err


def test_bench_prefill_help_runs_without_a_gpu():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_prefill.py"), "--help"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "--lengths" in result.stdout and "--layers" in result.stdout


def test_rounds_are_recorded_and_the_median_kept(tmp_path):
    out = tmp_path / "results"
    assert cli.main([*TINY[:-1], "1", "--rounds", "3", "--out", str(out)]) == 0
    _, rows = read_csv(out / f"{STEM}.csv")
    document = json.loads((out / f"{STEM}.json").read_text())
    for name in ("unfused", "fused", "dispatcher", "default"):
        rounds = [float(t) for t in rows[0][f"{name}_rounds_us"].split()]
        assert len(rounds) == 3
        assert float(rows[0][f"{name}_us"]) == pytest.approx(statistics.median(rounds), rel=1e-3)
        assert document["rows"][0]["contenders"][name]["rounds_us"] == pytest.approx(rounds, rel=1e-3)
    assert "--rounds 3" in document["metadata"]["command_line"]  # the command reproduces the rounds too
