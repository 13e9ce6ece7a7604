"""`moetune compare --dtype fp8_w8a8`: the fp8 layer beside the unquantized layer of the same
shape and beside the shipped fp8 configs on moetune's kernel, each checked against its own
float64 reference, under the interpreter (fp16 activations: it has no bf16 atomic add)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from moetune import loader, table_paths
from moetune.cli import main
from moetune.device import local_device
from moetune.quant import fp8_tolerance
from moetune.reference import TOLERANCE
from moetune.tables import new_table, table_path, write_table

pytestmark = pytest.mark.xdist_group("compare_fp8")

SHAPE = dict(E=4, N=16, K=32, topk=2)
FP8 = ["compare", "--E", "4", "--topk", "2", "--hidden", "32", "--intermediate", "16", "--dtype", "fp8_w8a8",
       "--block-shape", "16,16"]
STEM = "E4_N16_K32_topk2_fp8_w8a8_block16x16"
CONTENDERS = ["fp8", "fp16", "baseline"]
FP8_TUNED = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4,
             "num_stages": 2}
FP16_TUNED = {**FP8_TUNED, "BLOCK_SIZE_K": 32}
SHIPPED = {**FP8_TUNED, "BLOCK_SIZE_N": 16}


def tuned_table(root, dtype, config, block_shape=None):
    table = new_table(local_device(), **SHAPE, dtype=dtype, search={}, block_shape=block_shape)
    table["batch_sizes"] = {2: {"unfused": {"gemm1": config, "gemm2": config, "gemm1_us": 1.0, "gemm2_us": 1.0,
                                            "layer_us": 2.0}, "winner": "unfused"}}
    path = table_path(root, local_device().key, **SHAPE, dtype=dtype, block_shape=block_shape)
    write_table(path, table)
    return path


@pytest.fixture
def loader_sees(monkeypatch, tmp_path):
    """The loader sees only `tables`: no packaged tables, no other environment settings."""
    for name in (table_paths.ENV_CONFIG_DIR, loader.ENV_STRICT, loader.ENV_DETERMINISTIC):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(table_paths, "PACKAGED_DIR", tmp_path / "packaged")
    tables = tmp_path / "tables"
    monkeypatch.setenv(table_paths.ENV_CONFIG_DIR, str(tables))
    loader.clear_cache()
    yield tables
    loader.clear_cache()


def test_fp8_beside_the_tuned_unquantized_layer_and_the_shipped_fp8_configs(loader_sees, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plots are the other test's
    fp8_table = tuned_table(loader_sees, "fp8_w8a8", FP8_TUNED, block_shape=(16, 16))
    fp16_table = tuned_table(loader_sees, "fp16", FP16_TUNED)
    shipped = tmp_path / "shipped" / "E=4,N=16,device_name=cpu,dtype=fp8_w8a8,block_shape=[16, 16].json"
    shipped.parent.mkdir()
    shipped.write_text(json.dumps({"1": SHIPPED}))
    # A bf16 file of the same shape is not an fp8 baseline.
    (shipped.parent / "E=4,N=16,device_name=cpu.json").write_text(json.dumps({"1": FP16_TUNED}))
    out = tmp_path / "results"

    assert main([*FP8, "--batch-sizes", "2", "--baseline-configs", str(shipped.parent), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == [f"{STEM}.csv", f"{STEM}.json"]
    with open(out / f"{STEM}.csv", newline="", encoding="utf-8") as file:
        (row,) = list(csv.DictReader(file))
    assert row["fp8_source"] == str(fp8_table) and row["fp16_source"] == str(fp16_table)
    assert row["baseline_source"] == str(shipped) and row["baseline_gemm1"] == "M16 N16 K16 G1 w4 s2"
    tolerances = {"fp8": fp8_tolerance((16, 16)), "fp16": TOLERANCE[torch.float16], "baseline": fp8_tolerance((16, 16))}
    for name in CONTENDERS:
        assert 0 <= float(row[f"{name}_rel_error"]) <= tolerances[name], name
    us = {name: float(row[f"{name}_us"]) for name in CONTENDERS}
    assert float(row["fp8_over_fp16"]) == pytest.approx(us["fp8"] / us["fp16"], rel=1e-6)
    assert float(row["fp8_over_baseline"]) == pytest.approx(us["fp8"] / us["baseline"], rel=1e-6)

    document = json.loads((out / f"{STEM}.json").read_text())
    shape = document["shape"]
    assert (shape["dtype"], shape["block_shape"], shape["activations"]) == ("fp8_w8a8", [16, 16], "fp16")
    assert document["tolerances"] == pytest.approx(tolerances)
    assert list(document["rows"][0]["contenders"]) == CONTENDERS
    assert "--block-shape 16,16" in document["metadata"]["command_line"]
    assert "fp8/fp16" in printed and "fp8/base" in printed


def test_without_shipped_fp8_configs_the_report_says_so(loader_sees, tmp_path, capsys):
    out = tmp_path / "results"
    # The packaged baseline (the default) holds H200 files only.
    assert main([*FP8, "--batch-sizes", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no shipped fp8 configs for this shape" in printed
    for plot in ("time", "speedup"):  # the speedup plot shows fp8's time ratios
        assert (out / f"{STEM}_{plot}.png").read_bytes().startswith(b"\x89PNG")
    document = json.loads((out / f"{STEM}.json").read_text())
    assert list(document["rows"][0]["contenders"]) == ["fp8", "fp16"]
    assert document["rows"][0]["fp8_over_baseline"] is None
    assert any("no shipped fp8 configs for this shape" in note for note in document["metadata"]["notes"])
