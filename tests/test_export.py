"""vLLM/SGLang files: export, import, find_baseline.

tests/data/ holds real files, copied unchanged: `sglang-0.5.23/triton_3_7_1/` from the sglang 0.5.23
wheel (sglang/srt/layers/moe/moe_runner/triton_utils/configs/triton_3_7_1/; one entry lacks
num_warps/num_stages and the _down file has USE_TMA), fp8 files of the same wheel in `triton_3_6_0/`
(block 128 x 128, with _down) and `triton_3_1_0/` (per tensor), and `vllm-0.33.0/` from the vLLM 0.33.0 wheel
(vllm/model_executor/layers/fused_moe/configs/).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import triton

from moetune import cli, loader, table_paths
from moetune.configs import CONFIG_KEYS
from moetune.errors import TableError, UsageError
from moetune.baseline_configs import ANCHORS_FILE, Baseline, baseline_folder_for, find_baseline, packaged_baselines
from moetune.export import ForeignName, nearest, plan_export, read_foreign_configs, sglang_version_folder
from moetune.tables import table_path, validate_table, write_table
from tests.test_tables import CPU, H200, SHAPE, config, entry, make_table, timed

DATA = Path(__file__).parent / "data"
SGLANG_H200 = DATA / "sglang-0.5.23" / "triton_3_7_1" / "E=256,N=512,device_name=NVIDIA_H200.json"
SGLANG_H200_DOWN = SGLANG_H200.with_name("E=256,N=512,device_name=NVIDIA_H200_down.json")
VLLM_H200 = DATA / "vllm-0.33.0" / "E=128,N=768,device_name=NVIDIA_H200.json"
RUNNING_FOLDER = sglang_version_folder(triton.__version__)


@pytest.fixture(autouse=True)
def isolated(isolated_loader):
    """Every test runs with no loader environment settings and an empty packaged folder."""
    return isolated_loader


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    mine = {name: cli.COMMANDS[name] for name in ("show", "export", "import")}
    monkeypatch.setattr(cli, "COMMANDS", mine)  # the other commands' modules are not needed here
    status = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def read_like_vllm_and_sglang(path: Path) -> dict[int, dict]:
    """How both frameworks load a file (vLLM first drops "triton_version")."""
    with open(path) as f:
        configs = {int(key): value for key, value in json.load(f).items()}
    for value in configs.values():
        assert set(CONFIG_KEYS) <= set(value)
    return configs


def write(root: Path, table: dict) -> Path:
    shape = table["shape"]
    path = table_path(root, table["device"]["key"], shape["E"], shape["N"], shape["K"], shape["topk"], shape["dtype"])
    write_table(path, table)
    return path


def mixed_table(**kwargs) -> dict:
    """M=1: fused wins, GEMM 2 with its own BLOCK_SIZE_M; M=64: unfused only; M=256: fused only."""
    return make_table(batch_sizes={
        1: {"unfused": timed(config(n=32)), "fused": timed(config(n=64), config(m=32, n=128)), "winner": "fused"},
        64: {"unfused": timed(config(n=128), config(n=256, stages=4)), "winner": "unfused"},
        256: entry(None, config(m=64, n=64)),
    }, **kwargs)


# --- file names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, parts", [
    ("E=128,N=768,device_name=NVIDIA_H200.json", (128, 768, "NVIDIA_H200", None, None, False)),
    ("E=256,N=512,device_name=NVIDIA_H200_down.json", (256, 512, "NVIDIA_H200", None, None, True)),
    ("E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8.json", (8, 7168, "NVIDIA_H200", "fp8_w8a8", None, False)),
    ("E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128]_down.json",
     (128, 768, "NVIDIA_H100_80GB_HBM3", "fp8_w8a8", "[128, 128]", True)),
    ("E=64,N=640,device_name=NVIDIA_A100-SXM4-80GB,dtype=float32.json", (64, 640, "NVIDIA_A100-SXM4-80GB", "float32", None, False)),
])
def test_foreign_names_round_trip(name, parts):
    parsed = ForeignName.parse(name)
    assert (parsed.E, parsed.N, parsed.device_key, parsed.dtype, parsed.block_shape, parsed.down) == parts
    assert parsed.file_name == name


@pytest.mark.parametrize("name", ["E=128,N=768,K=2048,topk=8,dtype=bf16.json", "config.json", "E=1,N=2.json"])
def test_other_names_are_not_foreign_files(name):
    assert ForeignName.parse(name) is None


# --- reading real files --------------------------------------------------------------------

def test_read_real_sglang_files():
    up = read_foreign_configs(SGLANG_H200)
    assert list(up.configs) == [256, 512, 1024] and up.filled == [256]
    assert up.configs[256] == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
                               "num_warps": 4, "num_stages": 3}
    down = read_foreign_configs(SGLANG_H200_DOWN)
    assert "USE_TMA" not in down.configs[512] and down.configs[512]["BLOCK_SIZE_N"] == 64


def test_read_real_vllm_file():
    configs = read_foreign_configs(VLLM_H200).configs
    assert configs == {M: {key: value[key] for key in CONFIG_KEYS} for M, value in read_like_vllm_and_sglang(VLLM_H200).items()}
    assert 1 in configs and 4096 in configs


def test_every_shipped_vllm_and_sglang_file_in_the_repository_reads():
    files = sorted([*DATA.rglob("*.json"), *(folder / name for folder in packaged_baselines().values()
                                             for name in os.listdir(folder)
                                             if name.endswith(".json") and name != ANCHORS_FILE)])
    assert len(files) >= 7
    for path in files:
        assert ForeignName.parse(path.name).file_name == path.name
        assert read_foreign_configs(path).configs


@pytest.mark.parametrize("text, problem", [
    ('{"1": {"BLOCK_SIZE_M": 16}', "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"triton_version": "3.6.0"}', "holds no batch size"),
    ('{"one": {}}', "['one']: not a batch size"),
    ('{"0": {}}', "batch size must be positive"),
    ('{"16": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 48, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}}',
     '["16"].BLOCK_SIZE_N: must be a power of two >= 16, got 48'),
    ('{"16": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}}', '["16"]: is missing key(s) BLOCK_SIZE_N'),
])
def test_bad_foreign_files_name_file_and_key(tmp_path, text, problem):
    path = tmp_path / "E=8,N=64,device_name=NVIDIA_H200.json"
    path.write_text(text)
    with pytest.raises(TableError) as raised:
        read_foreign_configs(path)
    assert str(path) in str(raised.value) and problem in str(raised.value)


# --- export --------------------------------------------------------------------------------

def test_export_vllm_writes_unfused_gemm1(tmp_path, monkeypatch, capsys):
    table_file = write(tmp_path / "tables", mixed_table())
    out = tmp_path / "out"
    status, stdout, err = run_cli(monkeypatch, capsys, "export", "--format", "vllm", "--out", out, "--table", table_file)
    assert status == 0, err
    assert os.listdir(out) == ["E=128,N=768,device_name=NVIDIA_H200.json"]
    configs = read_like_vllm_and_sglang(out / "E=128,N=768,device_name=NVIDIA_H200.json")
    assert configs == {1: config(n=32), 64: config(n=128), 256: config(m=64, n=64)}
    assert "wrote" in stdout


def test_export_sglang_writes_winner_gemm1_and_gemm2(tmp_path, monkeypatch, capsys):
    table_file = write(tmp_path / "tables", mixed_table())
    out = tmp_path / "out"
    status, stdout, err = run_cli(monkeypatch, capsys, "export", "--format", "sglang", "--out", out, "--table", table_file)
    assert status == 0, err
    folder = out / "triton_3_6_0"  # the table's Triton version, not the running one
    up = read_like_vllm_and_sglang(folder / "E=128,N=768,device_name=NVIDIA_H200.json")
    down = read_like_vllm_and_sglang(folder / "E=128,N=768,device_name=NVIDIA_H200_down.json")
    assert up == {1: config(n=64), 64: config(n=128), 256: config(m=64, n=64)}
    # M=1: the fused GEMM 2 config has BLOCK_SIZE_M 32 against GEMM 1's 16, which SGLang cannot run.
    assert down == {1: config(n=64), 64: config(n=256, stages=4), 256: config(m=64, n=64)}
    assert all(up[M]["BLOCK_SIZE_M"] == down[M]["BLOCK_SIZE_M"] for M in up)
    assert "GEMM 1's config at M=1" in stdout


def test_export_fp32_uses_the_float32_selector(tmp_path, monkeypatch, capsys):
    table_file = write(tmp_path, make_table(dtype="fp32"))
    status, _, err = run_cli(monkeypatch, capsys, "export", "--format", "vllm", "--out", tmp_path / "out", "--table", table_file)
    assert status == 0, err
    assert os.listdir(tmp_path / "out") == ["E=128,N=768,device_name=NVIDIA_H200,dtype=float32.json"]


def test_bf16_wins_the_shared_file_name_over_fp16(tmp_path):
    bf16 = validate_table(make_table(), "bf16.json")
    fp16 = validate_table(make_table(dtype="fp16", batch_sizes={8: entry(config(n=256))}), "fp16.json")
    files, messages = plan_export([("fp16.json", fp16), ("bf16.json", bf16)], "vllm")
    assert [(str(file.relative), file.source) for file in files] == [("E=128,N=768,device_name=NVIDIA_H200.json", "bf16.json")]
    assert messages == ["skipped fp16.json: its vllm file E=128,N=768,device_name=NVIDIA_H200.json is written from bf16.json"]


def test_export_defaults_to_the_tables_the_loader_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loader, "local_device", lambda: CPU)
    used = write(tmp_path / "env", make_table(CPU, batch_sizes={2: entry(config(n=16))}))
    write(table_paths.PACKAGED_DIR, make_table(CPU, batch_sizes={4: entry(config(n=32))}))  # shadowed
    monkeypatch.setenv(table_paths.ENV_CONFIG_DIR, str(tmp_path / "env"))
    status, stdout, err = run_cli(monkeypatch, capsys, "export", "--format", "vllm", "--out", tmp_path / "out")
    assert status == 0, err
    assert read_like_vllm_and_sglang(tmp_path / "out" / "E=128,N=768,device_name=cpu.json") == {2: config(n=16)}
    assert str(used) in stdout


def bad_invocations(tmp_path: Path) -> list[tuple[list, str]]:
    """(argv, what the one line must name) for `export` and `import`."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    good = write(tmp_path / "tables", make_table())
    bad_table = tmp_path / "bad.json"
    bad_table.write_text("{")
    bad_foreign = tmp_path / "E=8,N=64,device_name=NVIDIA_H200.json"
    bad_foreign.write_text('{"1": {"BLOCK_SIZE_M": 12}}')
    other = tmp_path / "weights.json"
    other.write_text("{}")
    differs = tmp_path / "vllm" / VLLM_H200.name
    differs.parent.mkdir()
    differs.write_text(json.dumps({"1": config(n=16)}))
    out = tmp_path / "out"
    export = ["export", "--format", "vllm"]
    return [
        (["export", "--format", "xml", "--out", out, "--table", good], "'xml'"),
        ([*export, "--out", "/proc/moetune-export", "--table", good], "--out '/proc/moetune-export' is not writable"),
        ([*export, "--out", a_file, "--table", good], f"--out {str(a_file)!r}: {str(a_file)!r} is not a folder"),
        ([*export, "--out", a_file / "out", "--table", good], "is not a folder"),
        ([*export, "--out", out, "--table", tmp_path / "missing.json"], f"no such table: {tmp_path / 'missing.json'}"),
        ([*export, "--out", out, "--table", good, bad_table], str(bad_table)),
        ([*export, "--out", out], "no tables found"),
        (["import", VLLM_H200, "--out", "/proc/moetune-import"], "--out '/proc/moetune-import' is not writable"),
        (["import", VLLM_H200, "--out", a_file], f"--out {str(a_file)!r}"),
        (["import", tmp_path / "missing", "--out", out], f"no such file or folder: {tmp_path / 'missing'}"),
        (["import", VLLM_H200, bad_foreign, "--out", out], str(bad_foreign)),
        (["import", other, "--out", out], f"{other}: not a vLLM/SGLang config file name"),
        (["import", tmp_path / "tables", "--out", out], f"no vLLM/SGLang config files found in {tmp_path / 'tables'}"),
        (["import", VLLM_H200, differs, "--out", out], "would both become"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_invocation_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loader, "local_device", lambda: CPU)  # no tables for it
    argv, words = bad_invocations(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))

    status, stdout, err = run_cli(monkeypatch, capsys, *argv)

    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("moetune: error: ")
    assert words in err
    assert stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_written_files_are_readable_by_all_under_umask_022(tmp_path, monkeypatch, capsys):
    table_file = write(tmp_path / "tables", mixed_table())
    previous = os.umask(0o022)
    try:
        assert run_cli(monkeypatch, capsys, "export", "--format", "sglang", "--out", tmp_path / "exported",
                       "--table", table_file)[0] == 0
        assert run_cli(monkeypatch, capsys, "import", VLLM_H200, "--out", tmp_path / "imported")[0] == 0
    finally:
        os.umask(previous)
    written = [*(tmp_path / "exported").rglob("*.json"), *(tmp_path / "imported").rglob("*.json")]
    assert len(written) == 3
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {oct(0o644)}


# --- packaged baselines ------------------------------------------------------------------------

def test_baseline_configs_takes_a_folder_or_a_packaged_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = baseline_folder_for("sglang-vllm-h200")
    assert folder == packaged_baselines()["sglang-vllm-h200"] and folder.is_absolute()
    qwen3 = find_baseline(folder, 128, 768, "NVIDIA H200")
    assert qwen3.gemm1 == qwen3.gemm2 and 1 in qwen3.gemm1
    deepseek = find_baseline(folder, 256, 512, "NVIDIA_H200")
    assert len(deepseek.sources) == 2 and deepseek.sources[1].endswith("_down.json")
    assert find_baseline(folder, 64, 2560, "NVIDIA_H200") is not None
    # A folder of that name in the working directory is what the user means.
    (tmp_path / "sglang-vllm-h200").mkdir()
    assert baseline_folder_for("sglang-vllm-h200") == Path("sglang-vllm-h200")
    with pytest.raises(UsageError) as raised:
        baseline_folder_for("no-such-baseline")
    assert "--baseline-configs 'no-such-baseline'" in str(raised.value) and "sglang-vllm-h200" in str(raised.value)


# --- import and find_baseline ----------------------------------------------------------------

def test_import_real_files(tmp_path, monkeypatch, capsys):
    out = tmp_path / "baseline"
    status, stdout, err = run_cli(monkeypatch, capsys, "import", SGLANG_H200, SGLANG_H200_DOWN, VLLM_H200, "--out", out)
    assert status == 0, err
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*.json"))
    assert written == ["E=128,N=768,device_name=NVIDIA_H200.json",
                       "triton_3_7_1/E=256,N=512,device_name=NVIDIA_H200.json",
                       "triton_3_7_1/E=256,N=512,device_name=NVIDIA_H200_down.json"]
    for path in out.rglob("*.json"):
        for value in read_like_vllm_and_sglang(path).values():
            assert set(value) == set(CONFIG_KEYS)
    assert "set to Triton's launch defaults" in stdout

    baseline = find_baseline(out, 256, 512, "NVIDIA_H200")
    assert baseline.gemm1[512]["BLOCK_SIZE_N"] == 128 and baseline.gemm2[512]["BLOCK_SIZE_N"] == 64
    assert len(baseline.sources) == 2
    vllm = find_baseline(out, 128, 768, "NVIDIA H200")
    assert vllm.gemm1 == vllm.gemm2 and vllm.sources == [str(out / "E=128,N=768,device_name=NVIDIA_H200.json")]


def test_import_a_folder_skips_other_files(tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    shutil.copytree(DATA, source)
    (source / "notes.json").write_text("{}")
    status, stdout, err = run_cli(monkeypatch, capsys, "import", source, "--out", tmp_path / "out")
    assert status == 0, err
    assert "skipped" in stdout and "notes.json" in stdout
    assert len(list((tmp_path / "out").rglob("*.json"))) == 6


@pytest.mark.parametrize("format", ["vllm", "sglang"])
def test_round_trip_export_import_find_baseline(tmp_path, monkeypatch, capsys, format):
    table = mixed_table(triton=triton.__version__)
    table_file = write(tmp_path / "tables", table)
    assert run_cli(monkeypatch, capsys, "export", "--format", format, "--out", tmp_path / "exported", "--table", table_file)[0] == 0
    assert run_cli(monkeypatch, capsys, "import", tmp_path / "exported", "--out", tmp_path / "baseline")[0] == 0
    baseline = find_baseline(tmp_path / "baseline", 128, 768, "NVIDIA_H200", "bf16")
    assert isinstance(baseline, Baseline)
    entries = validate_table(table, "t")["batch_sizes"]
    if format == "vllm":
        assert baseline.gemm1 == {M: (e.get("unfused") or e["fused"])["gemm1"] for M, e in entries.items()}
        assert baseline.gemm2 == baseline.gemm1
    else:
        assert baseline.gemm1 == {M: e[e["winner"]]["gemm1"] for M, e in entries.items()}
        assert baseline.gemm2[64] == config(n=256, stages=4)
        assert all(str(tmp_path / "baseline" / RUNNING_FOLDER) in source for source in baseline.sources)
    assert find_baseline(tmp_path / "baseline", 128, 768, "NVIDIA_H200", "fp32") is None


def _put_foreign(folder: Path, name: str, block_n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"1": config(n=block_n), "64": config(n=block_n, m=64)}))
    return path


def test_find_baseline_prefers_running_triton_then_newest(tmp_path):
    name = "E=64,N=640,device_name=NVIDIA_H200.json"
    _put_foreign(tmp_path / "sglang" / "triton_3_1_0", name, 16)
    _put_foreign(tmp_path / "sglang" / "triton_9_9_9", name, 256)
    _put_foreign(tmp_path / "vllm", name, 32)
    _put_foreign(tmp_path / "sglang" / "triton_9_9_9", "E=64,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8.json", 64)
    _put_foreign(tmp_path / "sglang" / "triton_9_9_9", "E=64,N=640,device_name=NVIDIA_H100_80GB_HBM3.json", 64)
    assert find_baseline(tmp_path, 64, 640, "NVIDIA_H200").gemm1[1]["BLOCK_SIZE_N"] == 256
    running = _put_foreign(tmp_path / "sglang" / RUNNING_FOLDER, name, 128)
    running_down = _put_foreign(tmp_path / "sglang" / RUNNING_FOLDER, name.replace(".json", "_down.json"), 64)
    baseline = find_baseline(tmp_path, 64, 640, "NVIDIA_H200")
    assert baseline.gemm1[1]["BLOCK_SIZE_N"] == 128 and baseline.gemm2[1]["BLOCK_SIZE_N"] == 64
    assert baseline.sources == [str(running), str(running_down)]


def test_find_baseline_ignores_quantized_and_other_shapes(tmp_path):
    _put_foreign(tmp_path, "E=64,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8.json", 16)
    _put_foreign(tmp_path, "E=64,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json", 16)
    _put_foreign(tmp_path, "E=64,N=1280,device_name=NVIDIA_H200.json", 16)
    _put_foreign(tmp_path, "E=64,N=640,device_name=NVIDIA_H200_down.json", 16)  # GEMM 2 alone is not enough
    assert find_baseline(tmp_path, 64, 640, "NVIDIA_H200") is None
    assert find_baseline(tmp_path / "absent", 64, 640, "NVIDIA_H200") is None
    _put_foreign(tmp_path, "E=64,N=640,device_name=NVIDIA_H200,dtype=float32.json", 32)
    assert find_baseline(tmp_path, 64, 640, "NVIDIA_H200", "fp32").gemm1[1]["BLOCK_SIZE_N"] == 32


def test_nearest_ties_go_to_the_smaller_key():
    configs = {16: config(n=16), 32: config(n=32), 4096: config(n=64)}
    assert nearest(configs, 24) is configs[16]
    assert nearest(configs, 25) is configs[32]
    assert nearest(configs, 1) is configs[16]
    assert nearest(configs, 10**6) is configs[4096]
    with pytest.raises(ValueError):
        nearest({}, 1)


def test_sglang_version_folder():
    assert sglang_version_folder("3.6.0") == "triton_3_6_0"
    assert sglang_version_folder("3.7.1+git1234") == "triton_3_7_1"
    assert sglang_version_folder("3.4") == "triton_3_4_0"
    with pytest.raises(ValueError):
        sglang_version_folder("main")


def test_exported_table_device_comes_from_the_table(tmp_path):
    files, _ = plan_export([("h200.json", validate_table(make_table(H200), "t"))], "sglang")
    assert [str(file.relative) for file in files] == [
        "triton_3_6_0/E=128,N=768,device_name=NVIDIA_H200.json",
        "triton_3_6_0/E=128,N=768,device_name=NVIDIA_H200_down.json",
    ]
    assert SHAPE["E"] == 128
