"""The dispatcher: source precedence, nearest batch size, variants, warnings, caching, `show`."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from moetune import loader, table_paths
from moetune.configs import default_config
from moetune.errors import TableError
from moetune.loader import ConfigWarning, Selection, clear_cache, get_config, load_table, nearest_batch_size
from moetune.tables import table_path, write_table
from moetune.types import LaunchConfig, Variant
from tests.test_tables import A100, CPU, H100, H200, MALFORMED, NOT_TABLES, SHAPE, as_json, config, entry, make_table

SHAPE_ARGS = (SHAPE["E"], SHAPE["N"], SHAPE["K"], SHAPE["topk"], "bf16")


@pytest.fixture(autouse=True)
def isolated(isolated_loader):
    """Every test runs with no loader environment settings and an empty packaged folder."""
    return isolated_loader


def put(root, table, device_key=None) -> str:
    """Write a table where the loader looks for it; returns its path."""
    shape = table["shape"]
    path = table_path(root, device_key or table["device"]["key"], shape["E"], shape["N"], shape["K"],
                      shape["topk"], shape["dtype"])
    write_table(path, table)
    return str(path)


def use_env_dirs(monkeypatch, *folders):
    monkeypatch.setenv(table_paths.ENV_CONFIG_DIR, os.pathsep.join(str(folder) for folder in folders))
    clear_cache()


def quiet_get_config(*args, **kwargs) -> Selection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return get_config(*args, **kwargs)


def config_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(warning.message) for warning in caught if issubclass(warning.category, ConfigWarning)]


def only_at(M, gemm1, winner="unfused") -> dict:
    return make_table(batch_sizes={M: entry(gemm1) if winner == "unfused" else entry(None, gemm1)})


# --- sources ----------------------------------------------------------------------------

def test_source_precedence(tmp_path, monkeypatch):
    env1, env2, packaged = tmp_path / "env1", tmp_path / "env2", table_paths.PACKAGED_DIR
    env1_path = put(env1, only_at(1, config(n=16)))
    env2_path = put(env2, only_at(1, config(n=32)))
    packaged_path = put(packaged, only_at(1, config(n=64)))
    family_path = put(packaged, only_at(1, config(n=128)), H100.key)
    use_env_dirs(monkeypatch, env1, env2)

    def source():
        clear_cache()
        selection = quiet_get_config(*SHAPE_ARGS, 1, device=H200)
        return selection.source, selection.gemm1.block_n

    assert source() == (env1_path, 16)
    Path(env1_path).unlink()
    assert source() == (env2_path, 32)
    Path(env2_path).unlink()
    assert source() == (packaged_path, 64)
    Path(packaged_path).unlink()
    assert source() == (family_path, 128)
    Path(family_path).unlink()
    assert source() == ("default heuristic", default_config(1, *SHAPE_ARGS[:4])["BLOCK_SIZE_N"])


def test_other_shapes_and_dtypes_are_not_used(tmp_path, monkeypatch):
    put(tmp_path, make_table(E=64))
    put(tmp_path, make_table(dtype="fp16"))
    use_env_dirs(monkeypatch, tmp_path)
    assert quiet_get_config(*SHAPE_ARGS, 1, device=H200).source == "default heuristic"
    assert quiet_get_config(*SHAPE_ARGS[:4], torch.float16, 1, device=H200).source.endswith("dtype=fp16.json")


def test_device_given_by_name_or_key(tmp_path, monkeypatch):
    path = put(tmp_path, make_table())
    use_env_dirs(monkeypatch, tmp_path)
    assert quiet_get_config(*SHAPE_ARGS, 1, device="NVIDIA H200").source == path
    assert quiet_get_config(*SHAPE_ARGS, 1, device="NVIDIA_H200").source == path


def test_local_device_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "local_device", lambda: CPU)
    path = put(tmp_path, make_table(CPU))
    use_env_dirs(monkeypatch, tmp_path)
    assert get_config(*SHAPE_ARGS, 1).source == path


# --- nearest batch size ------------------------------------------------------------------

@pytest.mark.parametrize("M, expected", [(0, 16), (1, 16), (16, 16), (23, 16), (24, 16), (25, 32), (32, 32),
                                         (48, 32), (64, 64), (1000, 128), (10**6, 128)])
def test_nearest_batch_size_ties_go_to_smaller(M, expected):
    assert nearest_batch_size([128, 16, 64, 32], M) == expected


def test_get_config_uses_nearest_key(tmp_path, monkeypatch):
    put(tmp_path, make_table(batch_sizes={16: entry(config(n=16)), 32: entry(config(n=32))}))
    use_env_dirs(monkeypatch, tmp_path)
    for M, key in ((24, 16), (25, 32), (1, 16), (4096, 32)):
        selection = get_config(*SHAPE_ARGS, M, device=H200)
        assert (selection.batch_size, selection.gemm1.block_n) == (key, key)


def test_a_new_M_of_a_known_shape_looks_for_no_table_again(tmp_path, monkeypatch):
    """Serving sees many M per shape: the folders are searched once per shape, not per M."""
    put(tmp_path, make_table(batch_sizes={16: entry(config(n=16)), 32: entry(config(n=32))}))
    use_env_dirs(monkeypatch, tmp_path)
    searches = []
    real = loader.candidate_files
    monkeypatch.setattr(loader, "candidate_files", lambda *args: searches.append(args) or real(*args))
    picked = [get_config(*SHAPE_ARGS, M, device=H200).batch_size for M in (1, 24, 25, 4096)]
    assert picked == [16, 16, 32, 32]
    assert len(searches) == 1
    quiet_get_config(*SHAPE_ARGS[:-1], "fp16", 1, device=H200)  # another shape: a search of its own
    assert len(searches) == 2


# --- family fallback and default warnings ------------------------------------------------

def test_family_fallback_warns_once_naming_the_file(tmp_path, monkeypatch):
    family_path = put(tmp_path, make_table(H100))
    use_env_dirs(monkeypatch, tmp_path)
    with pytest.warns(ConfigWarning, match="tuned on NVIDIA H100 80GB HBM3") as caught:
        selection = get_config(*SHAPE_ARGS, 1, device=H200)
    assert selection.source == family_path
    assert any(family_path in str(warning.message) for warning in caught)
    # Another M misses the selection cache but must not warn again.
    assert config_warnings(lambda: get_config(*SHAPE_ARGS, 300, device=H200)) == []


def test_family_needs_the_same_compute_capability(tmp_path, monkeypatch):
    put(tmp_path, make_table(A100))
    use_env_dirs(monkeypatch, tmp_path)
    assert quiet_get_config(*SHAPE_ARGS, 1, device=H200).source == "default heuristic"
    assert quiet_get_config(*SHAPE_ARGS, 1, device=CPU).source == "default heuristic"


def test_family_of_a_named_device_comes_from_its_other_tables(tmp_path, monkeypatch):
    family_path = put(tmp_path, make_table(H100))
    put(tmp_path, make_table(E=64))  # an H200 table of another shape tells the H200's family
    use_env_dirs(monkeypatch, tmp_path)
    assert quiet_get_config(*SHAPE_ARGS, 1, device="NVIDIA H200").source == family_path


def test_default_warns_once_with_the_tune_command(monkeypatch):
    with pytest.warns(ConfigWarning) as caught:
        selection = get_config(*SHAPE_ARGS, 64, device=H200)
    command = "moetune run --gpu 'NVIDIA H200' --E 128 --topk 8 --hidden 2048 --intermediate 768 --dtype bf16"
    assert any(command in str(warning.message) for warning in caught)
    expected = LaunchConfig.from_json(default_config(64, *SHAPE_ARGS[:4]))
    assert selection == Selection(expected, expected, Variant.UNFUSED, "default heuristic", None)
    assert config_warnings(lambda: get_config(*SHAPE_ARGS, 65, device=H200)) == []


# --- variants ----------------------------------------------------------------------------

def both_variants() -> dict:
    """M=1: fused wins; M=64: only unfused; M=256: only fused."""
    return make_table(batch_sizes={
        1: entry(config(n=16), config(n=32), "fused"),
        64: entry(config(n=64)),
        256: entry(None, config(n=256)),
    })


def test_winner_is_picked(tmp_path, monkeypatch):
    put(tmp_path, both_variants())
    use_env_dirs(monkeypatch, tmp_path)
    assert get_config(*SHAPE_ARGS, 1, device=H200).variant == "fused"
    assert get_config(*SHAPE_ARGS, 70, device=H200).variant == "unfused"
    assert get_config(*SHAPE_ARGS, 200, device=H200).variant == "fused"


def test_variant_override_falls_back_to_nearest_key_that_has_it(tmp_path, monkeypatch):
    put(tmp_path, both_variants())
    use_env_dirs(monkeypatch, tmp_path)
    selection = get_config(*SHAPE_ARGS, 1, variant="unfused", device=H200)
    assert (selection.variant, selection.batch_size, selection.gemm1.block_n) == ("unfused", 1, 16)
    selection = get_config(*SHAPE_ARGS, 250, variant="unfused", device=H200)
    assert (selection.variant, selection.batch_size) == ("unfused", 64)
    selection = get_config(*SHAPE_ARGS, 64, variant="fused", device=H200)
    assert (selection.variant, selection.batch_size, selection.gemm1.block_n) == ("fused", 1, 32)


def test_variant_missing_everywhere_uses_the_default_for_that_variant(tmp_path, monkeypatch):
    path = put(tmp_path, make_table(batch_sizes={1: entry(config())}))
    use_env_dirs(monkeypatch, tmp_path)
    with pytest.warns(ConfigWarning, match="has no fused configs") as caught:
        selection = get_config(*SHAPE_ARGS, 8, variant="fused", device=H200)
    assert selection.source == "default heuristic" and selection.variant is Variant.FUSED
    assert selection.gemm1 == LaunchConfig.from_json(default_config(8, *SHAPE_ARGS[:4]))
    assert any(path in str(warning.message) for warning in caught)


@pytest.mark.parametrize("variant", list(Variant))
def test_asked_variant_without_any_table_gets_the_default_for_it(variant):
    selection = quiet_get_config(*SHAPE_ARGS, 8, variant=variant.value, device=H200)
    assert (selection.variant, selection.source) == (variant, "default heuristic")


def test_default_fits_the_device_it_is_for(monkeypatch):
    """The default heuristic's largest tile asks for more shared memory than an A100 has."""
    on_h200 = quiet_get_config(*SHAPE_ARGS, 4096, device=H200).gemm1
    on_a100 = quiet_get_config(*SHAPE_ARGS, 4096, device=A100).gemm1
    assert on_h200.fit_problem(2, A100.shared_memory_bytes) is not None
    assert on_a100.fit_problem(2, A100.shared_memory_bytes) is None


@pytest.mark.parametrize("bad", ["atomic", "Fused", "", 1])
def test_bad_variant_is_a_value_error(bad):
    with pytest.raises(ValueError, match="variant must be one of"):
        get_config(*SHAPE_ARGS, 1, variant=bad, device=H200)


def test_deterministic_never_picks_fused(tmp_path, monkeypatch):
    put(tmp_path, both_variants())
    use_env_dirs(monkeypatch, tmp_path)
    for M in (1, 200, 10**5):
        assert get_config(*SHAPE_ARGS, M, device=H200, deterministic=True).variant == "unfused"
    assert get_config(*SHAPE_ARGS, 1, device=H200, deterministic=False).variant == "fused"
    with pytest.raises(ValueError, match="deterministic"):
        get_config(*SHAPE_ARGS, 1, variant="fused", device=H200, deterministic=True)


def test_deterministic_from_environment(tmp_path, monkeypatch):
    put(tmp_path, both_variants())
    use_env_dirs(monkeypatch, tmp_path)
    monkeypatch.setenv(loader.ENV_DETERMINISTIC, "1")
    clear_cache()
    assert get_config(*SHAPE_ARGS, 1, device=H200).variant == "unfused"
    assert get_config(*SHAPE_ARGS, 200, device=H200).batch_size == 64
    with pytest.raises(ValueError, match=loader.ENV_DETERMINISTIC):
        get_config(*SHAPE_ARGS, 1, variant="fused", device=H200)


# --- Triton version ----------------------------------------------------------------------

def test_other_triton_version_is_used_with_one_warning(tmp_path, monkeypatch):
    path = put(tmp_path, make_table(triton="2.3.1"))
    use_env_dirs(monkeypatch, tmp_path)
    with pytest.warns(ConfigWarning, match="tuned with Triton 2.3.1"):
        assert get_config(*SHAPE_ARGS, 1, device=H200).source == path
    assert config_warnings(lambda: get_config(*SHAPE_ARGS, 2, device=H200)) == []


def test_same_triton_minor_does_not_warn(tmp_path, monkeypatch):
    import triton

    major, minor = triton.__version__.split(".")[:2]
    put(tmp_path, make_table(triton=f"{major}.{minor}.99"))
    use_env_dirs(monkeypatch, tmp_path)
    assert config_warnings(lambda: get_config(*SHAPE_ARGS, 1, device=H200)) == []


# --- bad tables --------------------------------------------------------------------------

def _bad_tables() -> dict[str, object]:
    """name -> the text of a bad table, or what makes something else stand at its path."""
    full = json.dumps(as_json(make_table()), indent=2)
    bad = {"bad JSON": "{'schema_version': 1}", "truncated": full[: len(full) * 2 // 3], "empty": ""}
    for name in ("unknown schema version", "no device", "no shape.K", "no batch sizes key", "no winner", "no gemm1",
                 "config missing key", "block not power of two", "block zero", "block as float", "winner absent",
                 "time as text", "unknown config key", "block of 2^40", "1000 stages", "shared memory"):
        mutate, _ = MALFORMED[name]
        table = as_json(make_table())
        mutate(table)
        bad[name] = json.dumps(table)
    for name in ("nested too deep", "a folder", "a dangling link", "not UTF-8"):
        bad[name] = NOT_TABLES[name][0]
    return bad


BAD_TABLES = _bad_tables()


def put_bad(root, bad) -> str:
    path = table_path(root, H200.key, *SHAPE_ARGS)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(bad, str):
        path.write_text(bad)
    else:
        bad(path)
    return str(path)


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_bad_table_raises_in_strict_mode(name, tmp_path, monkeypatch):
    bad_path = put_bad(tmp_path / "env", BAD_TABLES[name])
    put(table_paths.PACKAGED_DIR, make_table())
    use_env_dirs(monkeypatch, tmp_path / "env")
    with pytest.raises(TableError) as raised:
        get_config(*SHAPE_ARGS, 1, device=H200, strict=True)
    assert bad_path in str(raised.value)
    expected = MALFORMED.get(name) or NOT_TABLES.get(name)
    if expected is not None:
        assert expected[1] in str(raised.value)


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_bad_table_falls_back_with_one_warning(name, tmp_path, monkeypatch):
    bad_path = put_bad(tmp_path / "env", BAD_TABLES[name])
    good_path = put(table_paths.PACKAGED_DIR, make_table())
    use_env_dirs(monkeypatch, tmp_path / "env")
    with pytest.warns(ConfigWarning, match="skipping it") as caught:
        assert get_config(*SHAPE_ARGS, 1, device=H200).source == good_path
    assert any(bad_path in str(warning.message) for warning in caught)
    assert config_warnings(lambda: get_config(*SHAPE_ARGS, 7, device=H200)) == []


def test_strict_from_environment(tmp_path, monkeypatch):
    put_bad(tmp_path, BAD_TABLES["block zero"])
    use_env_dirs(monkeypatch, tmp_path)
    monkeypatch.setenv(loader.ENV_STRICT, "1")
    clear_cache()
    with pytest.raises(TableError, match="BLOCK_SIZE_N: must be positive"):
        get_config(*SHAPE_ARGS, 1, device=H200)
    assert quiet_get_config(*SHAPE_ARGS, 1, device=H200, strict=False).source == "default heuristic"


def test_bad_table_without_fallback_uses_default(tmp_path, monkeypatch):
    put_bad(tmp_path, BAD_TABLES["truncated"])
    use_env_dirs(monkeypatch, tmp_path)
    assert quiet_get_config(*SHAPE_ARGS, 1, device=H200).source == "default heuristic"


def test_load_table(tmp_path):
    good = put(tmp_path, make_table())
    assert list(load_table(good)["batch_sizes"]) == [1, 64]
    bad = put_bad(tmp_path / "other", BAD_TABLES["bad JSON"])
    with pytest.raises(TableError, match="not valid JSON"):
        load_table(bad)
    with pytest.warns(ConfigWarning, match="not valid JSON"):
        assert load_table(bad, strict=False) is None


# --- arguments and caching ---------------------------------------------------------------

@pytest.mark.parametrize("args", [(0, 768, 2048, 8, "bf16", 1), (128, 768, 2048, 8, "int8", 1),
                                  (128, 768, 2048, 8, "bf16", -1), (128, 768.0, 2048, 8, "bf16", 1)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        get_config(*args, device=H200)


def test_torch_dtype_and_name_agree(tmp_path, monkeypatch):
    put(tmp_path, make_table())
    use_env_dirs(monkeypatch, tmp_path)
    assert get_config(*SHAPE_ARGS[:4], torch.bfloat16, 5, device=H200) == get_config(*SHAPE_ARGS, 5, device=H200)


def test_cached_call_returns_the_same_object(tmp_path, monkeypatch):
    put(tmp_path, make_table())
    use_env_dirs(monkeypatch, tmp_path)
    first = get_config(*SHAPE_ARGS, 5, device=H200)
    assert get_config(*SHAPE_ARGS, 5, device=H200) is first
    # The cache is not re-read until cleared: a new folder is seen only after clear_cache().
    other = tmp_path / "other"
    put(other, only_at(1, config(n=256)))
    monkeypatch.setenv(table_paths.ENV_CONFIG_DIR, str(other))
    assert get_config(*SHAPE_ARGS, 5, device=H200) is first
    clear_cache()
    assert get_config(*SHAPE_ARGS, 5, device=H200).gemm1.block_n == 256
