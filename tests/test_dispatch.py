"""The dispatcher: fused_experts without a config takes configs and variant from the tables."""

import importlib
import json
import warnings

import pytest
import torch

from moetune import TableError, fused_experts, fused_moe
from moetune.configs import default_config
from moetune.device import local_device
from moetune.loader import ConfigWarning, clear_cache
from moetune.reference import TOLERANCE, fused_moe_reference, moe_reference, relative_error
from moetune.tables import new_table, table_path, write_table
from tests.moe_inputs import make_inputs, make_weights

E, N, K, TOPK, M = 4, 16, 32, 2, 6
PACKAGED = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}
PACKAGED_DOWN = {**PACKAGED, "BLOCK_SIZE_N": 16}


def write_tuned_table(root, winner):
    table = new_table(local_device(), E, N, K, TOPK, "fp32", {"trials": 1})
    times = {"gemm1_us": 1.0, "gemm2_us": 1.0}
    table["batch_sizes"] = {M: {"unfused": {"gemm1": PACKAGED, "gemm2": PACKAGED_DOWN, **times, "layer_us": 3.0},
                                "fused": {"gemm1": PACKAGED, "gemm2": PACKAGED_DOWN, **times, "layer_us": 2.0},
                                "winner": winner}}
    path = table_path(root, local_device().key, E, N, K, TOPK, "fp32")
    write_table(path, table)
    return path


@pytest.fixture
def launches(monkeypatch):
    """Record (config, atomic_add) of every grouped GEMM the layer launches."""
    seen = []
    experts = importlib.import_module("moetune.kernels.experts")  # where the layer's kernels are launched
    real = experts.grouped_gemm

    def recording(a, weights, out, aligned, config, **kwargs):
        seen.append((dict(config), kwargs.get("atomic_add", False)))
        return real(a, weights, out, aligned, config, **kwargs)

    monkeypatch.setattr(experts, "grouped_gemm", recording)
    return seen


@pytest.fixture
def tables(isolated_loader, tmp_path, monkeypatch):
    env = tmp_path / "env"
    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(env))
    return isolated_loader, env


def layer_inputs():
    return make_inputs(M, E, N, K, TOPK, torch.float32, torch.Generator().manual_seed(3))


def test_corrupt_env_table_falls_back_to_the_packaged_one(tables, launches):
    packaged, env = tables
    write_tuned_table(packaged, winner="unfused")
    corrupt = table_path(env, local_device().key, E, N, K, TOPK, "fp32")
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text('{"schema_version": 1, "batch_sizes": {"6": ')  # truncated
    x, w1, w2, weights, ids = layer_inputs()
    with pytest.warns(ConfigWarning, match="E=4,N=16,K=32,topk=2,dtype=fp32.json"):
        out = fused_experts(x, w1, w2, weights, ids)
    assert launches == [(PACKAGED, False), (PACKAGED_DOWN, False)]
    assert relative_error(out, moe_reference(x, w1, w2, weights, ids)) <= TOLERANCE[torch.float32]


def test_strict_mode_raises_on_the_corrupt_table(tables, monkeypatch):
    from moetune import TableError

    packaged, env = tables
    write_tuned_table(packaged, winner="unfused")
    corrupt = table_path(env, local_device().key, E, N, K, TOPK, "fp32")
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text("not json")
    monkeypatch.setenv("MOETUNE_STRICT", "1")
    clear_cache()
    with pytest.raises(TableError, match="E=4,N=16,K=32,topk=2,dtype=fp32.json"):
        fused_experts(*layer_inputs())


def test_table_winner_picks_the_atomic_path_unless_deterministic(tables, launches, monkeypatch):
    _, env = tables
    write_tuned_table(env, winner="fused")
    x, w1, w2, weights, ids = layer_inputs()
    reference = moe_reference(x, w1, w2, weights, ids)
    out = fused_experts(x, w1, w2, weights, ids)
    assert launches[-1] == (PACKAGED_DOWN, True)
    assert relative_error(out, reference) <= TOLERANCE[torch.float32]
    fused_experts(x, w1, w2, weights, ids, deterministic=True)
    assert launches[-1] == (PACKAGED_DOWN, False)
    monkeypatch.setenv("MOETUNE_DETERMINISTIC", "1")
    clear_cache()
    fused_experts(x, w1, w2, weights, ids)
    assert launches[-1] == (PACKAGED_DOWN, False)
    fused_experts(x, w1, w2, weights, ids, variant="unfused")
    assert launches[-1] == (PACKAGED_DOWN, False)


def test_no_table_uses_the_default_and_says_how_to_tune(tables, launches):
    x, w1, w2, weights, ids = layer_inputs()
    with pytest.warns(ConfigWarning, match="moetune run .*--E 4 --topk 2 --hidden 32 --intermediate 16"):
        out = fused_experts(x, w1, w2, weights, ids)
    assert relative_error(out, moe_reference(x, w1, w2, weights, ids)) <= TOLERANCE[torch.float32]
    assert all(not atomic for _, atomic in launches)


def test_public_api_reads_the_table(tables):
    import moetune

    packaged, _ = tables
    path = write_tuned_table(packaged, winner="fused")
    selection = moetune.get_config(E, N, K, TOPK, torch.float32, 5)
    assert (selection.variant, selection.batch_size, selection.source) == ("fused", M, str(path))
    assert selection.gemm2.to_json() == PACKAGED_DOWN
    assert moetune.get_config(E, N, K, TOPK, "fp32", 5, variant="unfused").variant == "unfused"
    assert sorted(moetune.load_table(path)["batch_sizes"]) == [M]


def test_asked_variant_runs_without_any_table(tables, launches):
    x, w1, w2, weights, ids = layer_inputs()
    with pytest.warns(ConfigWarning, match="no tuned table"):
        out = fused_experts(x, w1, w2, weights, ids, variant="fused")
    default = default_config(M, E, N, K, TOPK)
    assert launches == [(default, False), (default, True)]  # GEMM 2 adds atomically: the fused path
    assert relative_error(out, moe_reference(x, w1, w2, weights, ids)) <= TOLERANCE[torch.float32]


def config_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(warning.message) for warning in caught if issubclass(warning.category, ConfigWarning)]


def test_a_table_whose_block_overflows_int32_falls_back(tables, monkeypatch):
    """BLOCK_SIZE_N = 2^40 is an int the schema's types allow; its bound rejects the table."""
    packaged, _ = tables
    path = write_tuned_table(packaged, winner="unfused")
    table = json.loads(path.read_text())
    table["batch_sizes"][str(M)]["unfused"]["gemm2"]["BLOCK_SIZE_N"] = 2**40
    path.write_text(json.dumps(table))
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=generator)
    w1, w2 = make_weights(E, N, K, torch.float32, generator)
    logits = torch.randn(M, E, generator=generator)
    messages = config_warnings(lambda: fused_moe(x, w1, w2, logits, TOPK))
    assert [message for message in messages if "skipping it" in message] == [
        f"bad table {path}: batch_sizes[\"{M}\"].unfused.gemm2.BLOCK_SIZE_N: must be at most 512, got {2**40}; skipping it"]
    with warnings.catch_warnings(record=True) as caught:  # warned once: not again
        warnings.simplefilter("always")
        out = fused_moe(x, w1, w2, logits, TOPK)
    assert [warning for warning in caught if issubclass(warning.category, ConfigWarning)] == []
    assert relative_error(out, fused_moe_reference(x, w1, w2, logits, TOPK)) <= TOLERANCE[torch.float32]
    monkeypatch.setenv("MOETUNE_STRICT", "1")
    clear_cache()
    with pytest.raises(TableError, match=f"bad table {path}: .*BLOCK_SIZE_N: must be at most 512"):
        fused_moe(x, w1, w2, logits, TOPK)


def test_a_folder_where_a_table_should_be_is_a_bad_table(tables, monkeypatch):
    packaged, env = tables
    write_tuned_table(packaged, winner="unfused")
    folder = table_path(env, local_device().key, E, N, K, TOPK, "fp32")
    folder.mkdir(parents=True)
    x, w1, w2, weights, ids = layer_inputs()
    messages = config_warnings(lambda: fused_experts(x, w1, w2, weights, ids, variant="unfused"))
    assert messages == [f"bad table {folder}: a folder stands where a table file should be; skipping it"]
    monkeypatch.setenv("MOETUNE_STRICT", "1")
    clear_cache()
    with pytest.raises(TableError, match=f"bad table {folder}: a folder stands"):
        fused_experts(x, w1, w2, weights, ids)


def test_config_keys_the_kernel_does_not_know_are_named_once(tables):
    x, w1, w2, weights, ids = make_inputs(2, E, N, K, TOPK, torch.float32, torch.Generator().manual_seed(4))
    vllm_style = {**PACKAGED, "SPLIT_K": 1}
    messages = config_warnings(lambda: fused_experts(x, w1, w2, weights, ids, config=vllm_style))
    assert len(messages) == 1 and "'SPLIT_K'" in messages[0]
    assert config_warnings(lambda: fused_experts(x, w1, w2, weights, ids, config=vllm_style)) == []
    sglang_style = {**PACKAGED, "USE_TMA": False}  # SGLang's key for its own kernel: no warning
    assert config_warnings(lambda: fused_experts(x, w1, w2, weights, ids, config=sglang_style)) == []
