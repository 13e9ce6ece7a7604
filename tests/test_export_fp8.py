"""fp8 tables in the frameworks' fp8 file names: exported under the names vLLM and SGLang ship,
and the shipped fp8 files (tests/data/sglang-0.5.23/triton_3_6_0 and triton_3_1_0, copied
unchanged from the sglang 0.5.23 wheel) imported as baselines for fp8 tunes of their mode."""

from __future__ import annotations

import os
from pathlib import Path

import triton

from moetune.baseline_configs import find_baseline
from moetune.export import sglang_version_folder
from moetune.tables import TableDtype, new_table, table_path, write_table
from tests.test_export import DATA, run_cli
from tests.test_tables import H200, config, entry

SHIPPED = DATA / "sglang-0.5.23"
BLOCK_NAME = "E=256,N=512,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json"  # SGLang's
PER_TENSOR_NAME = "E=64,N=2560,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"
RUNNING_FOLDER = sglang_version_folder(triton.__version__)


def fp8_table_file(root: Path, E: int, N: int, block_shape) -> Path:
    table = new_table(H200, E, N, 7168, 8, "fp8_w8a8", {"trials": 1}, block_shape=block_shape)
    table["versions"]["triton"] = triton.__version__
    table["batch_sizes"] = {1: entry(config(n=64, k=128), config(n=128, k=128), "fused"),
                            64: entry(config(m=32, n=128, k=64))}
    path = table_path(root, H200.key, E, N, 7168, 8, "fp8_w8a8", block_shape)
    write_table(path, table)
    return path


def test_fp8_tables_export_under_the_names_the_frameworks_ship(tmp_path, monkeypatch, capsys, isolated_loader):
    tables = [fp8_table_file(tmp_path / "tables", 256, 512, [128, 128]),
              fp8_table_file(tmp_path / "tables", 64, 2560, None)]
    shipped = {name for folder in SHIPPED.iterdir() for name in os.listdir(folder) if "fp8" in name}
    for format in ("sglang", "vllm"):
        status, _, err = run_cli(monkeypatch, capsys, "export", "--format", format, "--out", tmp_path / format,
                                 "--table", *tables)
        assert status == 0, err
    sglang = set(os.listdir(tmp_path / "sglang" / RUNNING_FOLDER))
    assert sglang == {BLOCK_NAME, BLOCK_NAME.replace(".json", "_down.json"), PER_TENSOR_NAME,
                      PER_TENSOR_NAME.replace(".json", "_down.json")}
    assert sglang & shipped == shipped  # the names SGLang ships, space and _down included
    assert set(os.listdir(tmp_path / "vllm")) == {  # vLLM's spelling: no space
        "E=256,N=512,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json", PER_TENSOR_NAME}


def test_shipped_fp8_files_import_as_baselines_of_their_quant_mode(tmp_path, monkeypatch, capsys, isolated_loader):
    status, _, err = run_cli(monkeypatch, capsys, "import", SHIPPED, "--out", tmp_path / "imported")
    assert status == 0, err
    out = tmp_path / "imported"
    assert os.listdir(out / "triton_3_6_0") == os.listdir(SHIPPED / "triton_3_6_0")  # names kept as shipped
    block = find_baseline(out, 256, 512, "NVIDIA H200", TableDtype("fp8_w8a8", (128, 128)))  # as the tuner asks
    assert [Path(source).name for source in block.sources] == [BLOCK_NAME, BLOCK_NAME.replace(".json", "_down.json")]
    assert block.gemm1[512]["BLOCK_SIZE_K"] == 128 and block.gemm2 != block.gemm1
    assert find_baseline(out, 256, 512, "NVIDIA_H200", "fp8_w8a8", [128, 128]).sources == block.sources
    assert find_baseline(out, 256, 512, "NVIDIA_H200", "fp8_w8a8", [64, 64]) is None  # another block shape
    assert find_baseline(out, 256, 512, "NVIDIA_H200", "fp8_w8a8") is None  # per tensor: none shipped
    per_tensor = find_baseline(out, 64, 2560, "NVIDIA_H200", "fp8_w8a8")
    assert [Path(source).name for source in per_tensor.sources] == [PER_TENSOR_NAME]
    bf16 = find_baseline(out, 256, 512, "NVIDIA_H200", "bf16")
    assert [Path(source).parent.name for source in bf16.sources] == ["triton_3_7_1"] * 2
