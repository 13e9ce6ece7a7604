"""`moetune show`: the tables a device would use, in lookup order, and the configs picked."""

from __future__ import annotations

import warnings

import pytest

from moetune import cli, loader, table_paths
from moetune.tables import table_path
from tests.test_loader import both_variants, put, put_bad, use_env_dirs
from tests.test_tables import H100, H200, NOT_TABLES, make_table


@pytest.fixture(autouse=True)
def isolated(isolated_loader):
    return isolated_loader


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "COMMANDS", {"show": cli.COMMANDS["show"]})  # the other commands are not needed here
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_show_lists_tables_in_lookup_order(tmp_path, monkeypatch, capsys):
    env_path = put(tmp_path / "env", both_variants())
    packaged_path = put(table_paths.PACKAGED_DIR, make_table())
    family_path = put(table_paths.PACKAGED_DIR, make_table(H100, E=64))
    put_bad(tmp_path / "bad", "")
    use_env_dirs(monkeypatch, tmp_path / "env", tmp_path / "bad")
    monkeypatch.setattr(loader, "local_device", lambda: H200)

    status, out, err = run_cli(monkeypatch, capsys, "show")
    assert status == 0, err
    assert "tables for NVIDIA H200 (key NVIDIA_H200, compute capability 9.0)" in out
    lines = out.splitlines()
    row = {path: next(line for line in lines if line.endswith(path)) for path in (env_path, packaged_path, family_path)}
    assert "used" in row[env_path] and "MOETUNE_CONFIG_DIR" in row[env_path]
    assert "shadowed" in row[packaged_path] and "packaged" in row[packaged_path]
    assert "used" in row[family_path] and "same family (NVIDIA_H100_80GB_HBM3)" in row[family_path]
    assert any("invalid" in line for line in lines) and "empty file" in out
    assert lines.index(row[env_path]) < lines.index(row[packaged_path])
    # Per batch size: the variant picked and both configs, compact.
    assert any(line.split()[:3] == ["1", "fused", "winner"] and "M16 N32 K64 G1 w4 s3" in line for line in lines)
    assert any(line.split()[:3] == ["256", "fused", "winner"] for line in lines)


def test_show_filters_and_device_option(tmp_path, monkeypatch, capsys):
    put(tmp_path, make_table())
    put(tmp_path, make_table(E=64, topk=4))
    use_env_dirs(monkeypatch, tmp_path)
    status, out, _ = run_cli(monkeypatch, capsys, "show", "--gpu", "NVIDIA_H200", "--E", "64")
    assert status == 0
    assert "E=64,N=768,K=2048,topk=4,dtype=bf16.json" in out and "E=128" not in out
    status, out, _ = run_cli(monkeypatch, capsys, "show", "--gpu", "NVIDIA H200", "--dtype", "fp16")
    assert status == 0 and "no tables found" in out


def test_show_deterministic_explains_the_choice(tmp_path, monkeypatch, capsys):
    put(tmp_path, both_variants())
    use_env_dirs(monkeypatch, tmp_path)
    monkeypatch.setenv(loader.ENV_DETERMINISTIC, "1")
    status, out, _ = run_cli(monkeypatch, capsys, "show", "--gpu", "NVIDIA H200")
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()}
    assert status == 0
    assert rows["1"] == ["unfused", "deterministic"]
    assert rows["64"] == ["unfused", "winner"]
    assert rows["256"] == ["unfused", "unfused"]  # "unfused at M=64"


def test_show_reports_each_bad_table_in_one_line(tmp_path, monkeypatch, capsys):
    env = tmp_path / "env"
    bad_paths = []
    # Named to sort before the good table: the device's compute capability is read from the first valid one.
    for E, name in zip((10, 11, 12, 13), ("nested too deep", "a folder", "a dangling link", "not UTF-8")):
        path = table_path(env, H200.key, E, 768, 2048, 8, "bf16")
        path.parent.mkdir(parents=True, exist_ok=True)
        NOT_TABLES[name][0](path)
        bad_paths.append(str(path))
    good_path = put(env, make_table())
    use_env_dirs(monkeypatch, env)
    with warnings.catch_warnings(record=True) as caught:  # the listing says it all: no warning besides
        warnings.simplefilter("always")
        status, out, err = run_cli(monkeypatch, capsys, "show", "--gpu", "NVIDIA H200")
    assert (status, err, [str(warning.message) for warning in caught]) == (0, "", [])
    errors = [line for line in out.splitlines() if line.startswith("   ")]
    assert len(errors) == len(bad_paths) and all(path in line for path, line in zip(bad_paths, errors))
    assert sum("invalid" in line for line in out.splitlines()) == len(bad_paths)
    assert any(line.endswith(good_path) and " used " in line for line in out.splitlines())


# (arguments, text the one-line error must hold: the bad value)
BAD_INVOCATIONS = [
    (["--gpu", "NoSuchGPU"], "'NoSuchGPU'"),
    (["--gpu", " "], "--gpu needs a device name"),
    (["--E", "-1"], "'-1'"),
    (["--E", "0"], "'0'"),
    (["--topk", "0"], "'0'"),
    (["--hidden", "x"], "'x'"),
    (["--intermediate", "2.5"], "'2.5'"),
    (["--dtype", "int4"], "'int4'"),
    (["--nope"], "--nope"),
]


@pytest.mark.parametrize("argv, words", BAD_INVOCATIONS, ids=[" ".join(argv) for argv, _ in BAD_INVOCATIONS])
def test_bad_invocation_is_one_line_and_exit_2(argv, words, tmp_path, monkeypatch, capsys):
    put(tmp_path / "env", make_table())
    use_env_dirs(monkeypatch, tmp_path / "env")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    status, out, err = run_cli(monkeypatch, capsys, "show", *argv)
    assert status == 2
    assert out == "" and err.startswith("moetune: error: ") and err.count("\n") == 1
    assert words in err
    assert list(cwd.iterdir()) == []
