"""fp8 tables: keyed by quant mode, BLOCK_SIZE_K checked against the scale block, found by
get_config and run by the layer with fp8 weights."""

import json
import warnings

import pytest
import torch

from moetune import TableError, fused_experts, get_config, quantize_weights
from moetune.device import local_device
from moetune.kernels.routing import select_experts
from moetune.loader import ConfigWarning, clear_cache
from moetune.quant import fp8_moe_reference, fp8_tolerance
from moetune.reference import relative_error
from moetune.tables import new_table, table_path, write_atomic
from tests.test_dispatch import launches  # noqa: F401 - a fixture
from tests.moe_inputs import make_weights

E, N, K, TOPK, M = 4, 24, 40, 2, 7
BLOCK = [16, 16]
# Distinguishable from the default heuristic's configs: BLOCK_SIZE_N 32, GEMM 2's 16.
TUNED = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 2, "num_stages": 2}
TUNED_DOWN = {**TUNED, "BLOCK_SIZE_N": 16}


def fp8_table(gemm1=TUNED, gemm2=TUNED_DOWN, block_shape=BLOCK) -> dict:
    table = new_table(local_device(), E, N, K, TOPK, "fp8_w8a8", {"trials": 1}, block_shape=block_shape)
    times = {"gemm1_us": 1.0, "gemm2_us": 1.0, "layer_us": 2.0}
    table["batch_sizes"] = {"8": {"unfused": {"gemm1": gemm1, "gemm2": gemm2, **times}, "winner": "unfused"}}
    return table


@pytest.fixture
def env(isolated_loader, tmp_path, monkeypatch):
    folder = tmp_path / "env"
    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(folder))
    return folder


def write(env, table, block_shape=BLOCK):
    path = table_path(env, local_device().key, E, N, K, TOPK, "fp8_w8a8", block_shape)
    write_atomic(path, json.dumps(table))  # as written by hand: unchecked
    return path


@pytest.fixture(scope="module")
def fp8_layer():
    rng = torch.Generator().manual_seed(17)
    x = torch.randn(M, K, generator=rng).to(torch.float16)
    w1, w2 = make_weights(E, N, K, torch.float32, rng)
    (w1_q, w1_s), (w2_q, w2_s) = quantize_weights(w1, BLOCK), quantize_weights(w2, BLOCK)
    weights, ids = select_experts(torch.randn(M, E, generator=rng), TOPK, True)
    return x, w1_q, w2_q, w1_s, w2_s, weights, ids


def run_layer(fp8_layer):
    x, w1_q, w2_q, w1_s, w2_s, weights, ids = fp8_layer
    out = fused_experts(x, w1_q, w2_q, weights, ids, w1_scale=w1_s, w2_scale=w2_s, block_shape=BLOCK)
    reference = fp8_moe_reference(x, w1_q, w2_q, w1_s, w2_s, weights, ids, BLOCK)
    assert relative_error(out, reference) <= fp8_tolerance(BLOCK)


def test_the_layer_runs_the_fp8_table_of_its_block_shape(env, launches, poison_empty, fp8_layer):
    path = write(env, fp8_table())
    # A table of another quant mode, or bf16, of the same shape is never taken for it.
    per_tensor_path = write(env, fp8_table(gemm1={**TUNED, "BLOCK_SIZE_N": 128}, block_shape=None), block_shape=None)
    selection = get_config(E, N, K, TOPK, "fp8_w8a8", M, block_shape=BLOCK)
    assert selection.source == str(path) and selection.batch_size == 8
    assert selection.gemm1.to_json() == TUNED and selection.gemm2.to_json() == TUNED_DOWN
    assert get_config(E, N, K, TOPK, torch.float8_e4m3fn, M, block_shape=(16, 16)) == selection
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        run_layer(fp8_layer)
    assert [config for config, _ in launches] == [TUNED, TUNED_DOWN]
    per_tensor = get_config(E, N, K, TOPK, "fp8_w8a8", M)
    assert per_tensor.gemm1.block_n == 128 and per_tensor.source == str(per_tensor_path)
    with pytest.warns(ConfigWarning, match="no tuned table.*dtype=fp16.*--dtype fp16"):
        get_config(E, N, K, TOPK, torch.float16, M)


def test_a_block_size_k_across_scale_blocks_is_rejected(env, monkeypatch, launches, poison_empty, fp8_layer):
    bad = {**TUNED, "BLOCK_SIZE_K": 32}  # two scale blocks of 16 along K
    path = write(env, fp8_table(gemm2=bad))
    monkeypatch.setenv("MOETUNE_STRICT", "1")
    with pytest.raises(TableError) as error:
        get_config(E, N, K, TOPK, "fp8_w8a8", M, block_shape=BLOCK)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert 'batch_sizes["8"].unfused.gemm2.BLOCK_SIZE_K' in message and "got 32" in message and "16" in message
    monkeypatch.delenv("MOETUNE_STRICT")
    clear_cache()
    with pytest.warns(ConfigWarning) as warned:
        run_layer(fp8_layer)  # skipped: the default heuristic, its K tile within a block
    text = " ".join(str(w.message) for w in warned)
    assert "BLOCK_SIZE_K" in text and "skipping it" in text
    assert "--dtype fp8_w8a8 --block-shape 16,16" in text  # the command that tunes it
    assert launches and all(config["BLOCK_SIZE_K"] <= 16 for config, _ in launches)
