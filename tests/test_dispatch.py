"""The dispatcher: fused_experts without a config takes configs and variant from the tables."""

import pytest
import torch

import moetune.layer as layer
from moetune import fused_experts
from moetune.device import local_device
from moetune.loader import ConfigWarning, clear_cache
from moetune.reference import TOLERANCE, moe_reference, relative_error
from moetune.tables import new_table, table_path, write_table
from tests.moe_inputs import make_inputs

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
    real = layer.grouped_gemm

    def recording(a, weights, out, aligned, config, **kwargs):
        seen.append((dict(config), kwargs.get("atomic_add", False)))
        return real(a, weights, out, aligned, config, **kwargs)

    monkeypatch.setattr(layer, "grouped_gemm", recording)
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
    assert selection.gemm2 == PACKAGED_DOWN
    assert moetune.get_config(E, N, K, TOPK, "fp32", 5, variant="unfused").variant == "unfused"
    assert sorted(moetune.load_table(path)["batch_sizes"]) == [M]
