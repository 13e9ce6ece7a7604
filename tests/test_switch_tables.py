"""Kernel switches in tables (schema version 2): read, validated against the configs and the
device, honoured by the dispatcher; version-1 tables still read, as all switches off."""

import importlib
import json
import warnings

import pytest
import torch

from moetune import Switches, TableError, fused_experts
from moetune.device import local_device
from moetune.loader import get_config, load_table
from moetune.reference import TOLERANCE, moe_reference, relative_error
from moetune.tables import SCHEMA_VERSION, read_table, table_path, validate_table, write_table
from tests.moe_inputs import make_inputs
from tests.test_tables import config, make_table, timed

E, N, K, TOPK, M = 4, 16, 32, 2, 6
SMALL = config(m=16, n=32, k=32, stages=2)


def with_switches(table: dict, switches: dict, gemm2: dict | None = None) -> dict:
    for entry in table["batch_sizes"].values():
        for variant in ("unfused", "fused"):
            if variant in entry:
                entry[variant]["switches"] = switches
                if gemm2 is not None:
                    entry[variant]["gemm2"] = gemm2
    return table


def test_a_version_one_table_reads_as_all_switches_off():
    table = make_table()
    table["schema_version"] = 1
    for entry in table["batch_sizes"].values():
        for variant in ("unfused", "fused"):
            entry.get(variant, {}).pop("switches", None)
    clean = validate_table(table, "v1.json")
    assert SCHEMA_VERSION == 2
    assert all(record["switches"] == {} for entry in clean["batch_sizes"].values()
               for record in (entry.get("unfused"), entry.get("fused")) if record)


def test_switches_round_trip_through_a_table_file(tmp_path):
    path = tmp_path / "t.json"
    write_table(path, with_switches(make_table(), {"sorted_rows": True, "tma_activations": True}))
    read = read_table(path)
    record = next(iter(read["batch_sizes"].values()))["unfused"]
    assert Switches.from_json(record["switches"]) == Switches(sorted_rows=True, tma_activations=True)
    assert json.loads(path.read_text())["schema_version"] == 2


@pytest.mark.parametrize("switches, gemm2, words", [
    ({"split_k": 3}, None, "switches: split_k must be one of 1, 2, 4, 8, 16, got 3"),
    ({"SPLIT_K": 2}, None, "switches: unknown switch 'SPLIT_K'"),
    ({"persistent": "yes"}, None, "persistent must be true or false, got 'yes'"),
    ({"tma_activations": True}, None, "tma_activations needs sorted_rows"),
    ({"fuse_activation": True, "split_k": 2}, None, "cannot go together"),
    ({"sorted_rows": True}, config(m=32), "sorted_rows needs one BLOCK_SIZE_M"),
])
def test_a_bad_switch_is_named_with_file_key_and_value(switches, gemm2, words):
    table = with_switches(make_table(), switches, gemm2)
    with pytest.raises(TableError) as error:
        validate_table(table, "/x/t.json")
    message = str(error.value)
    assert message.startswith("bad table /x/t.json: batch_sizes[")
    assert words in message


def test_fused_silu_must_fit_two_weight_tiles_in_shared_memory():
    # 64x128x128, 4 stages: 196608 B alone fits an H200; with gate and up tiles, 327680 B does not.
    wide = config(m=64, n=128, k=128, stages=4, warps=8)
    table = make_table(batch_sizes={"64": {"unfused": timed(wide), "winner": "unfused"}})
    validate_table(table, "plain.json")
    with pytest.raises(TableError, match="gemm1: does not fit NVIDIA H200: shared memory 327680 B"):
        validate_table(with_switches(table, {"fuse_activation": True}), "fused_silu.json")


@pytest.fixture
def tuned(isolated_loader, tmp_path, monkeypatch):
    """A table for this machine's device whose unfused variant runs with `switches`."""
    env = tmp_path / "env"
    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(env))

    def write(switches: dict) -> str:
        table = make_table(device=local_device(), dtype="fp32", E=E, N=N, K=K, topk=TOPK,
                           batch_sizes={str(M): {"unfused": timed(SMALL), "winner": "unfused"}})
        path = table_path(env, local_device().key, E, N, K, TOPK, "fp32")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(with_switches(table, switches)))  # as written, even when invalid
        return str(path)
    return write


def test_the_dispatcher_runs_the_tables_switches(tuned, monkeypatch, poison_empty):
    tuned({"sorted_rows": True, "fuse_activation": True})
    experts = importlib.import_module("moetune.kernels.experts")
    seen, real = [], experts.grouped_gemm

    def recording(*args, **kwargs):
        seen.append({key: kwargs.get(key, False) for key in ("c_sorted", "a_sorted", "fuse_activation")})
        return real(*args, **kwargs)

    monkeypatch.setattr(experts, "grouped_gemm", recording)
    assert get_config(E, N, K, TOPK, "fp32", M).switches == Switches(sorted_rows=True, fuse_activation=True)
    x, w1, w2, weights, ids = make_inputs(M, E, N, K, TOPK, torch.float32, torch.Generator().manual_seed(5))
    out = fused_experts(x, w1, w2, weights, ids)
    assert relative_error(out, moe_reference(x, w1, w2, weights, ids)) <= TOLERANCE[torch.float32]
    assert seen == [{"c_sorted": True, "a_sorted": False, "fuse_activation": True},
                    {"c_sorted": False, "a_sorted": True, "fuse_activation": False}]


def test_a_table_with_a_bad_switch_falls_back_outside_strict_mode(tuned, poison_empty):
    path = tuned({"split_k": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection = get_config(E, N, K, TOPK, "fp32", M)
    assert selection.switches == Switches() and selection.source != path
    assert any("split_k" in str(w.message) and path in str(w.message) for w in caught)
    with pytest.raises(TableError, match="split_k"):
        load_table(path, strict=True)


def test_given_switches_must_suit_the_given_configs():
    x, w1, w2, weights, ids = make_inputs(M, E, N, K, TOPK, torch.float32, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="sorted_rows needs one BLOCK_SIZE_M"):
        fused_experts(x, w1, w2, weights, ids, config=SMALL, down_config=config(m=32, n=32, k=32, stages=2),
                      switches={"sorted_rows": True})
