"""The table record: names, validation, reading within limits, atomic writing, merging."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import resource
import signal
import stat
from datetime import datetime

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetune.device import DeviceInfo
from moetune.errors import TableError
from moetune.files import MAX_JSON_BYTES, MAX_JSON_NESTING
from moetune.tables import (
    SCHEMA_VERSION,
    BatchRecord,
    Table,
    dtype_name,
    merge_tables,
    new_table,
    parse_table_file_name,
    read_record,
    read_table,
    record_batch,
    table_file_name,
    table_path,
    validate_table,
    write_table,
)
from moetune.types import LaunchConfig, Variant

H200 = DeviceInfo("NVIDIA H200", "NVIDIA_H200", (9, 0), 232448)
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3", (9, 0), 232448)
CPU = DeviceInfo("cpu", "cpu", None, 232448)
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", "NVIDIA_A100-SXM4-80GB", (8, 0), 166912)
SHAPE = dict(E=128, N=768, K=2048, topk=8)


def config(m=16, n=64, k=64, group=1, warps=4, stages=3) -> dict:
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": group,
            "num_warps": warps, "num_stages": stages}


def timed(gemm1: dict, gemm2: dict | None = None, layer_us: float = 25.0) -> dict:
    return {"gemm1": gemm1, "gemm2": gemm2 or gemm1, "gemm1_us": 10.1, "gemm2_us": 8.2, "layer_us": layer_us}


def entry(unfused: dict | None = None, fused: dict | None = None, winner: str | None = None) -> dict:
    result = {}
    if unfused is not None:
        result["unfused"] = timed(unfused)
    if fused is not None:
        result["fused"] = timed(fused)
    result["winner"] = winner or ("unfused" if unfused is not None else "fused")
    return result


def make_table(device: DeviceInfo = H200, dtype: str = "bf16", batch_sizes: dict | None = None,
               triton: str = "3.6.0", **shape) -> dict:
    """A valid table; its configs default to two batch sizes, 1 (fused wins) and 64 (unfused)."""
    table = new_table(device, **{**SHAPE, **shape}, dtype=dtype,
                      search={"sampler": "TPESampler(multivariate=True)", "trials": 40, "seed": 0,
                              "time_budget_min": None, "space": {"BLOCK_SIZE_M": [16, 32]}})
    table["versions"]["triton"] = triton
    table["batch_sizes"] = batch_sizes if batch_sizes is not None else {
        1: entry(config(n=64), config(n=128), "fused"),
        64: entry(config(m=32, n=128, k=64, group=8)),
    }
    return table


def as_json(table: dict) -> dict:
    """What the table looks like once written and parsed again (string keys)."""
    return json.loads(json.dumps(table))


# --- names ------------------------------------------------------------------------------

def test_file_name_and_path(tmp_path):
    assert table_file_name(128, 768, 2048, 8, "bf16") == "E=128,N=768,K=2048,topk=8,dtype=bf16.json"
    assert table_file_name(8, 14336, 4096, 2, torch.float16) == "E=8,N=14336,K=4096,topk=2,dtype=fp16.json"
    path = table_path(tmp_path, "NVIDIA_H200", 128, 768, 2048, 8, torch.bfloat16)
    assert path == tmp_path / "NVIDIA_H200" / "E=128,N=768,K=2048,topk=8,dtype=bf16.json"
    assert parse_table_file_name(path.name) == (128, 768, 2048, 8, "bf16", None)
    assert parse_table_file_name("E=128,N=768,device_name=NVIDIA_H200.json") is None
    assert parse_table_file_name("E=1,N=2,K=3,topk=1,dtype=int8.json") is None


def test_fp8_file_names_round_trip():
    block = "E=256,N=256,K=7168,topk=8,dtype=fp8_w8a8,block_shape=[128,128].json"  # vLLM's spelling
    assert table_file_name(256, 256, 7168, 8, "fp8_w8a8", [128, 128]) == block
    assert table_file_name(256, 256, 7168, 8, torch.float8_e4m3fn, (128, 128)) == block
    assert parse_table_file_name(block) == (256, 256, 7168, 8, "fp8_w8a8", (128, 128))
    per_tensor = "E=8,N=64,K=64,topk=2,dtype=fp8_w8a8.json"
    assert table_file_name(*parse_table_file_name(per_tensor)) == per_tensor
    assert parse_table_file_name(per_tensor).block_shape is None
    for bad in ("E=1,N=2,K=3,topk=1,dtype=bf16,block_shape=[128,128].json",  # blocks are fp8's
                "E=1,N=2,K=3,topk=1,dtype=fp8_w8a8,block_shape=[128, 128].json",  # SGLang's spelling
                "E=1,N=2,K=3,topk=1,dtype=fp8_w8a8,block_shape=[100,128].json"):
        assert parse_table_file_name(bad) is None, bad
    with pytest.raises(ValueError, match="block_shape"):
        table_file_name(1, 2, 3, 1, "bf16", [128, 128])


@pytest.mark.parametrize("given, expected", [
    (torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32"),
    ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"),
])
def test_dtype_name(given, expected):
    assert dtype_name(given) == expected


@pytest.mark.parametrize("bad", [torch.float8_e4m3fn, torch.int8, "int8", "fp8", None, 16])
def test_dtype_name_rejects_others_naming_them(bad):
    with pytest.raises(ValueError, match="unsupported dtype") as raised:
        dtype_name(bad)
    assert repr(bad) in str(raised.value)


def test_new_table_header():
    table = new_table(H200, 128, 768, 2048, 8, torch.bfloat16, {"trials": 3})
    assert table["schema_version"] == SCHEMA_VERSION
    assert table["device"] == {"name": "NVIDIA H200", "key": "NVIDIA_H200", "compute_capability": [9, 0]}
    assert set(table["versions"]) == {"triton", "torch", "moetune"}
    assert all(isinstance(value, str) and value for value in table["versions"].values())
    assert datetime.fromisoformat(table["created"]).tzinfo is not None
    assert table["shape"] == {"E": 128, "N": 768, "K": 2048, "topk": 8, "dtype": "bf16"}
    assert table["search"] == {"trials": 3} and table["batch_sizes"] == {}
    assert new_table(CPU, 8, 64, 64, 2, "fp32", {})["device"]["compute_capability"] is None


# --- validation -------------------------------------------------------------------------

def test_valid_table_comes_back_clean():
    table = make_table()
    table["batch_sizes"][1]["fused"]["gemm1"]["USE_TMA"] = True  # extra config keys are dropped
    clean = validate_table(as_json(table), "t.json")
    assert list(clean["batch_sizes"]) == [1, 64]
    assert clean["batch_sizes"][1]["winner"] == "fused"
    assert clean["batch_sizes"][1]["fused"]["gemm1"] == config(n=128)
    assert isinstance(clean["batch_sizes"][1]["fused"]["layer_us"], float)
    assert validate_table(clean, "t.json") == clean  # int keys are accepted in memory too


def test_error_names_file_and_key_path():
    table = as_json(make_table(batch_sizes={16: {"fused": timed(config(), config(n=48)), "winner": "fused"}}))
    with pytest.raises(TableError) as raised:
        validate_table(table, "/x/y.json")
    assert str(raised.value) == (
        'bad table /x/y.json: batch_sizes["16"].fused.gemm2.BLOCK_SIZE_N: must be a power of two >= 16, got 48'
    )


def _drop(*path):
    def mutate(table):
        *parents, last = path
        for key in parents:
            table = table[key]
        del table[last]
    return mutate


def _set(value, *path):
    def mutate(table):
        *parents, last = path
        for key in parents:
            table = table[key]
        table[last] = value
    return mutate


# (mutation of the JSON form, text the error must contain)
MALFORMED = {
    "unknown schema version": (_set(3, "schema_version"), "schema_version: unknown schema version 3"),
    "schema version as text": (_set("1", "schema_version"), "schema_version: must be an integer"),
    "top level not an object": (lambda table: table.clear() or table.update({"schema_version": 1}), "device: missing"),
    "no schema_version": (_drop("schema_version"), "schema_version: missing"),
    "no device": (_drop("device"), "device: missing"),
    "no device name": (_drop("device", "name"), "device.name: missing"),
    "device key mismatch": (_set("H200", "device", "key"), "device.key: must be 'NVIDIA_H200'"),
    "bad compute capability": (_set([9], "device", "compute_capability"), "device.compute_capability"),
    "no versions.triton": (_drop("versions", "triton"), "versions.triton: missing"),
    "bad created": (_set("yesterday", "created"), "created: must be an ISO 8601 time"),
    "no shape.K": (_drop("shape", "K"), "shape.K: missing"),
    "shape.E text": (_set("128", "shape", "E"), "shape.E: must be an integer"),
    "shape.topk zero": (_set(0, "shape", "topk"), "shape.topk: must be positive"),
    "shape dtype": (_set("int8", "shape", "dtype"), "shape.dtype: must be one of"),
    "search not object": (_set([], "search"), "search: must be a JSON object, got array"),
    "no batch sizes key": (_drop("batch_sizes"), "batch_sizes: missing"),
    "empty batch sizes": (_set({}, "batch_sizes"), "batch_sizes: holds no batch size"),
    "batch size zero": (lambda t: t["batch_sizes"].update({"0": t["batch_sizes"]["1"]}), 'batch_sizes["0"]'),
    "batch size not a number": (lambda t: t["batch_sizes"].update({"big": t["batch_sizes"]["1"]}), 'batch_sizes["big"]'),
    "batch size padded": (lambda t: t["batch_sizes"].update({"016": t["batch_sizes"]["1"]}), 'batch_sizes["016"]'),
    "no winner": (_drop("batch_sizes", "1", "winner"), 'batch_sizes["1"].winner: missing'),
    "winner absent": (_set("fused", "batch_sizes", "64", "winner"), 'batch_sizes["64"].winner: must name a variant present'),
    "winner unknown": (_set("both", "batch_sizes", "1", "winner"), 'batch_sizes["1"].winner'),
    "neither variant": (_set({"winner": "fused"}, "batch_sizes", "1"), 'batch_sizes["1"]: holds neither variant'),
    "variant not object": (_set([1], "batch_sizes", "1", "fused"), 'batch_sizes["1"].fused: must be a JSON object'),
    "no gemm1": (_drop("batch_sizes", "1", "fused", "gemm1"), 'batch_sizes["1"].fused.gemm1: missing'),
    "no layer time": (_drop("batch_sizes", "64", "unfused", "layer_us"), 'batch_sizes["64"].unfused.layer_us: missing'),
    "negative time": (_set(-1.0, "batch_sizes", "1", "fused", "gemm2_us"), 'batch_sizes["1"].fused.gemm2_us: must be a positive'),
    "NaN time": (_set(float("nan"), "batch_sizes", "1", "fused", "layer_us"), 'batch_sizes["1"].fused.layer_us'),
    "time as text": (_set("25", "batch_sizes", "1", "fused", "layer_us"), 'batch_sizes["1"].fused.layer_us'),
    "config missing key": (_drop("batch_sizes", "1", "unfused", "gemm2", "num_stages"),
                           'batch_sizes["1"].unfused.gemm2: is missing key(s) num_stages'),
    "block not power of two": (_set(48, "batch_sizes", "64", "unfused", "gemm1", "BLOCK_SIZE_K"),
                               'batch_sizes["64"].unfused.gemm1.BLOCK_SIZE_K: must be a power of two >= 16, got 48'),
    "block too small": (_set(8, "batch_sizes", "64", "unfused", "gemm1", "BLOCK_SIZE_M"),
                        'batch_sizes["64"].unfused.gemm1.BLOCK_SIZE_M: must be a power of two >= 16'),
    "block zero": (_set(0, "batch_sizes", "1", "fused", "gemm2", "BLOCK_SIZE_N"),
                   'batch_sizes["1"].fused.gemm2.BLOCK_SIZE_N: must be positive'),
    "block negative": (_set(-16, "batch_sizes", "1", "fused", "gemm2", "BLOCK_SIZE_M"),
                       'batch_sizes["1"].fused.gemm2.BLOCK_SIZE_M: must be positive'),
    "warps not power of two": (_set(3, "batch_sizes", "1", "fused", "gemm1", "num_warps"),
                               'batch_sizes["1"].fused.gemm1.num_warps'),
    "block as float": (_set(16.0, "batch_sizes", "1", "fused", "gemm1", "BLOCK_SIZE_M"),
                       'batch_sizes["1"].fused.gemm1.BLOCK_SIZE_M: must be an int'),
    "block as bool": (_set(True, "batch_sizes", "1", "fused", "gemm1", "GROUP_SIZE_M"),
                      'batch_sizes["1"].fused.gemm1.GROUP_SIZE_M: must be an int'),
    "config as list": (_set([16, 64], "batch_sizes", "1", "fused", "gemm1"), 'batch_sizes["1"].fused.gemm1: must be a dict'),
    "unknown config key": (_set(4, "batch_sizes", "1", "fused", "gemm1", "SPLIT_K"),
                           'batch_sizes["1"].fused.gemm1.SPLIT_K: unknown launch config key (value 4)'),
    "block of 2^40": (_set(2**40, "batch_sizes", "1", "fused", "gemm2", "BLOCK_SIZE_N"),
                      'batch_sizes["1"].fused.gemm2.BLOCK_SIZE_N: must be at most 512, got 1099511627776'),
    "block of 1024": (_set(1024, "batch_sizes", "1", "fused", "gemm2", "BLOCK_SIZE_K"),
                      'batch_sizes["1"].fused.gemm2.BLOCK_SIZE_K: must be at most 512'),
    "1024 warps": (_set(1024, "batch_sizes", "1", "fused", "gemm2", "num_warps"),
                   'batch_sizes["1"].fused.gemm2.num_warps: must be a power of two <= 32, got 1024'),
    "1000 stages": (_set(1000, "batch_sizes", "1", "unfused", "gemm1", "num_stages"),
                    'batch_sizes["1"].unfused.gemm1.num_stages: must be at most 16, got 1000'),
    "group of 100000": (_set(100000, "batch_sizes", "64", "unfused", "gemm2", "GROUP_SIZE_M"),
                        'batch_sizes["64"].unfused.gemm2.GROUP_SIZE_M: must be at most 1024, got 100000'),
    "shared memory": (_set(config(m=256, n=256, k=256, stages=4), "batch_sizes", "64", "unfused", "gemm1"),
                      'batch_sizes["64"].unfused.gemm1: does not fit NVIDIA H200: shared memory 1048576 B > limit 232448 B'),
    "registers": (_set(config(m=256, n=256, k=16, stages=2), "batch_sizes", "64", "unfused", "gemm2"),
                  'batch_sizes["64"].unfused.gemm2: does not fit NVIDIA H200: 256x256 tile on 4 warps needs 512 '
                  'accumulator registers per thread'),
    "huge batch size": (lambda t: t["batch_sizes"].update({"9" * 30: t["batch_sizes"]["1"]}),
                        'batch_sizes["999999999999999999999999999999"]: batch size must be between 1 and'),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_table_raises_naming_file_and_key(name):
    mutate, expected = MALFORMED[name]
    table = as_json(make_table())
    mutate(table)
    with pytest.raises(TableError) as raised:
        validate_table(table, "/tables/NVIDIA_H200/t.json")
    assert str(raised.value).startswith("bad table /tables/NVIDIA_H200/t.json: ")
    assert expected in str(raised.value)


@pytest.mark.parametrize("value", [None, [], "table", 3])
def test_non_object_table(value):
    with pytest.raises(TableError, match="must be a JSON object"):
        validate_table(value, "t.json")


# 128x256x64 in 4 stages: 196608 B of bf16 tiles, within an H200's 232448 B but not an A100's 166912 B.
BIG_TILE = config(m=128, n=256, k=64, group=8, warps=8, stages=4)


def test_configs_must_fit_the_device_the_table_is_for():
    at_64 = {64: entry(BIG_TILE)}
    validate_table(as_json(make_table(batch_sizes=at_64)), "h200.json")
    with pytest.raises(TableError, match=r'a100.json: batch_sizes\["64"\].unfused.gemm1: does not fit NVIDIA A100.*'
                                         r'shared memory 196608 B > limit 166912 B'):
        validate_table(as_json(make_table(A100, batch_sizes=at_64)), "a100.json")
    unknown = as_json(make_table(batch_sizes=at_64))
    unknown["device"]["compute_capability"] = [11, 0]  # an unknown device: Hopper's limit
    validate_table(unknown, "new.json")
    # fp32 operands take 4 bytes: the same tile needs twice the memory.
    with pytest.raises(TableError, match="shared memory 393216 B > limit 232448 B"):
        validate_table(as_json(make_table(dtype="fp32", batch_sizes=at_64)), "fp32.json")


def test_cpu_tables_have_no_compute_capability():
    table = as_json(make_table(CPU))
    validate_table(table, "t.json")
    table["device"]["compute_capability"] = [9, 0]
    with pytest.raises(TableError, match="device.compute_capability: must be null"):
        validate_table(table, "t.json")


# Random mutations: validation either accepts the table or raises TableError, nothing else.

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
_mutation = st.tuples(st.sampled_from(["drop", "replace", "rename"]), st.integers(0, 10**6), _json_values)


def _locations(value, path=()):
    """Every (container, key) pair in a JSON document."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield value, key
            yield from _locations(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield value, index
            yield from _locations(child, (*path, index))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_random_mutations_accept_or_raise_table_error(mutations):
    table = as_json(make_table())
    for action, where, value in mutations:
        locations = list(_locations(table))
        container, key = locations[where % len(locations)]
        if action == "drop":
            del container[key]
        elif action == "replace" or isinstance(container, list):
            container[key] = value
        else:
            container[str(value)[:8]] = container.pop(key)
    try:
        clean = validate_table(copy.deepcopy(table), "t.json")
    except TableError as error:
        assert str(error).startswith("bad table t.json: ")
    else:
        assert all(isinstance(M, int) and M > 0 for M in clean["batch_sizes"])


# --- files ------------------------------------------------------------------------------

def test_write_then_read(tmp_path):
    table = make_table()
    path = table_path(tmp_path, "NVIDIA_H200", dtype="bf16", **SHAPE)
    write_table(path, table)  # creates the device folder
    on_disk = json.loads(path.read_text())
    assert list(on_disk["batch_sizes"]) == ["1", "64"]
    assert read_table(path) == validate_table(table, str(path))
    assert os.listdir(path.parent) == [path.name]


def _write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_read_bad_json_names_file(tmp_path):
    path = _write_text(tmp_path / "t.json", '{"schema_version": 1,, }')
    with pytest.raises(TableError, match=f"bad table {path}: not valid JSON at line 1"):
        read_table(path)


def test_read_truncated_file(tmp_path):
    full = json.dumps(make_table(), indent=2)
    path = _write_text(tmp_path / "t.json", full[: len(full) // 2])
    with pytest.raises(TableError, match=r"not valid JSON .*truncated"):
        read_table(path)


def test_read_empty_and_missing_files(tmp_path):
    with pytest.raises(TableError, match="empty file"):
        read_table(_write_text(tmp_path / "empty.json", ""))
    with pytest.raises(TableError, match=f"cannot read table {tmp_path / 'absent.json'}"):
        read_table(tmp_path / "absent.json")


def test_read_rejects_shape_that_does_not_match_file_name(tmp_path):
    path = tmp_path / table_file_name(64, 768, 2048, 8, "bf16")
    _write_text(path, json.dumps(make_table()))
    with pytest.raises(TableError, match="shape: E=128,N=768,K=2048,topk=8,dtype=bf16 does not match the file name"):
        read_table(path)


def test_failed_validation_writes_nothing(tmp_path):
    bad = make_table()
    bad["batch_sizes"][1]["winner"] = "nobody"
    path = tmp_path / "NVIDIA_H200" / "t.json"
    with pytest.raises(TableError):
        write_table(path, bad)
    assert not path.exists()

    write_table(path, make_table())
    before = path.read_bytes()
    with pytest.raises(TableError):
        write_table(path, bad)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["t.json"]


def test_write_that_fails_half_way_leaves_the_old_table_and_no_temp(tmp_path):
    """A file-size limit makes the write fail after its first bytes, as a full disk would."""
    path = tmp_path / "t.json"
    write_table(path, make_table())
    before = path.read_bytes()
    bigger = make_table(batch_sizes={M: entry(config()) for M in range(1, 40)})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(OSError) as raised:
            write_table(path, bigger)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert "File too large" in str(raised.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_tables_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    path = tmp_path / "t.json"
    old = os.umask(umask)
    try:
        write_table(path, make_table())
        created = stat.S_IMODE(path.stat().st_mode)
        write_table(path, make_table(batch_sizes={8: entry(config())}))  # replacing a file
        replaced = stat.S_IMODE(path.stat().st_mode)
    finally:
        os.umask(old)
    assert created == replaced == mode


# --- reading within limits: whatever stands at a table's path is a TableError -------------

def _deep(path):
    path.write_text('{"schema_version": 1, "search": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _too_large(path):
    with open(path, "wb") as file:  # sparse: nothing is written but the size
        file.truncate(MAX_JSON_BYTES + 1)


def _fifo(path):
    os.mkfifo(path)  # opening it would block the reader


NOT_TABLES = {
    "nested too deep": (_deep, f"nested deeper than {MAX_JSON_NESTING} levels"),
    "too large": (_too_large, f"{MAX_JSON_BYTES + 1} bytes, more than the {MAX_JSON_BYTES}"),
    "a folder": (lambda path: path.mkdir(), "a folder stands where a table file should be"),
    "a FIFO": (_fifo, "not a regular file"),
    "a dangling link": (lambda path: path.symlink_to(path.parent / "absent"), "cannot read table"),
    "a link loop": (lambda path: path.symlink_to(path), "cannot read table"),
    "not UTF-8": (lambda path: path.write_bytes(b'{"a": "\xff"}'), "not UTF-8 text (byte 7)"),
    "an integer of 5000 digits": (lambda path: path.write_text("[" + "7" * 5000 + "]"), "not valid JSON: Exceeds"),
}


@pytest.mark.parametrize("name", list(NOT_TABLES))
def test_what_is_not_a_table_is_a_table_error_naming_the_file(name, tmp_path):
    make, expected = NOT_TABLES[name]
    path = tmp_path / "E=128,N=768,K=2048,topk=8,dtype=bf16.json"
    make(path)
    with pytest.raises(TableError) as raised:
        read_table(path)
    assert str(path) in str(raised.value) and expected in str(raised.value)
    assert "\n" not in str(raised.value)


# --- merging ----------------------------------------------------------------------------

def test_merge_replaces_same_batch_sizes_and_keeps_others():
    old = as_json(make_table(triton="3.5.1", batch_sizes={1: entry(config(n=32)), 8: entry(config(n=64))}))
    new = make_table(triton="3.6.0", batch_sizes={8: entry(config(n=256)), 512: entry(config(m=64))})
    merged = merge_tables(old, new)
    assert list(merged["batch_sizes"]) == [1, 8, 512]
    assert merged["batch_sizes"][1]["unfused"]["gemm1"] == config(n=32)
    assert merged["batch_sizes"][8]["unfused"]["gemm1"] == config(n=256)
    assert merged["versions"]["triton"] == "3.6.0"
    assert merged["created"] == new["created"] and merged["search"] == new["search"]
    validate_table(merged, "merged")


def test_merge_refuses_other_shape_or_device():
    with pytest.raises(TableError, match="two shapes"):
        merge_tables(make_table(), make_table(E=64))
    with pytest.raises(TableError, match="two devices"):
        merge_tables(make_table(), make_table(H100))


# --- the typed record ---------------------------------------------------------------------

def test_record_round_trip():
    table = Table.from_json(as_json(make_table()), "t.json")
    assert table.batch_sizes[1].winner is Variant.FUSED
    assert table.batch_sizes[1].variants[Variant.FUSED].gemm1 == LaunchConfig.from_json(config(n=128))
    assert table.shape.key() == (128, 768, 2048, 8, "bf16", None) and table.device.compute_capability == (9, 0)
    assert table.to_json() == validate_table(as_json(make_table()), "t.json")
    assert Table.from_json(json.loads(json.dumps(table.to_json())), "again.json") == table


def test_batch_record_needs_its_winner():
    record = BatchRecord.from_json(entry(config(), config(n=128), "fused"))
    assert set(record.variants) == {Variant.UNFUSED, Variant.FUSED}
    with pytest.raises(ValueError, match="winner 'fused' is not among the variants"):
        BatchRecord({Variant.UNFUSED: record.variants[Variant.UNFUSED]}, Variant.FUSED)
    with pytest.raises(TableError, match="bad batch record .*winner: must name a variant present here"):
        BatchRecord.from_json(entry(config(), winner="fused"))


def _record(M: int, block_n: int = 64) -> BatchRecord:
    return BatchRecord.from_json(entry(config(n=block_n)), f"M={M}")


def test_record_batch_creates_then_merges(tmp_path):
    path = table_path(tmp_path, H200.key, dtype="bf16", **SHAPE)
    record_batch(path, H200, *SHAPE.values(), "bf16", 8, _record(8), {"trials": 1})
    written = record_batch(path, H200, *SHAPE.values(), torch.bfloat16, 1, _record(1, 128), {"trials": 2})
    assert read_record(path) == Table.from_json(written.to_json(), str(path))
    assert sorted(written.batch_sizes) == [1, 8] and written.search == {"trials": 2}
    replaced = record_batch(path, H200, *SHAPE.values(), "bf16", 8, _record(8, 32), {"trials": 3})
    assert replaced.batch_sizes[8].variants[Variant.UNFUSED].gemm1.block_n == 32
    assert os.listdir(path.parent) == [path.name]


def _record_batch_sizes(path, sizes):
    for M in sizes:
        record_batch(path, H200, *SHAPE.values(), "bf16", M, _record(M), {})


def test_two_processes_recording_into_one_table_lose_no_batch_size(tmp_path):
    path = table_path(tmp_path, H200.key, dtype="bf16", **SHAPE)
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_record_batch_sizes, args=(path, range(first, 41, 2))) for first in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert sorted(read_record(path).batch_sizes) == list(range(1, 41))
