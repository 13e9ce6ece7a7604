"""A fuzzed corpus of table files where the dispatcher looks first: truncations, type swaps,
huge values, deep nesting, wrong shapes, folders and unreadable files.

Outside strict mode the dispatcher never raises: a bad table is skipped with one warning
naming it and the next source serves; strict mode raises TableError naming the file;
`moetune show` lists each bad table in one line and exits 0 or 2, never with a traceback.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetune import cli, fused_moe, loader, table_paths
from moetune.device import local_device
from moetune.errors import TableError
from moetune.files import MAX_JSON_NESTING
from moetune.reference import TOLERANCE, fused_moe_reference, relative_error
from moetune.tables import read_record, table_path, write_table
from tests.moe_inputs import make_weights
from tests.test_tables import NOT_TABLES, _json_values, _locations, as_json, config, entry, make_table

E, N, K, TOPK, DTYPE = 4, 16, 32, 2, "fp32"
SHAPE = dict(E=E, N=N, K=K, topk=TOPK)


def _table(**shape) -> dict:
    return as_json(make_table(local_device(), DTYPE, {1: entry(config(n=32, k=32)), 8: entry(config(n=32, k=32, stages=2))},
                              **{**SHAPE, **shape}))


VALID = _table()
TEXT = json.dumps(VALID, indent=2)
DEEP = "@deep@"  # stands for nesting too deep to build as an object: replaced in the text


def _mutated(where: int, value) -> str:
    table = copy.deepcopy(VALID)
    locations = list(_locations(table))
    container, key = locations[where % len(locations)]
    container[key] = value
    return json.dumps(table)


def _text(text: str):
    return lambda path: path.write_text(text)


_where = st.integers(0, 10**6)
_huge = st.sampled_from([2**40, 2**64, 10**30, -(2**40), 1e308, float("inf"), float("nan"), "x" * 100_000, [0] * 10_000])
CORPUS = st.one_of(
    st.integers(0, len(TEXT) - 1).map(lambda n: _text(TEXT[:n])),  # truncated
    st.tuples(_where, _json_values).map(lambda t: _text(_mutated(*t))),  # a value of another type
    st.tuples(_where, _huge).map(lambda t: _text(_mutated(*t))),
    st.tuples(_where, st.integers(MAX_JSON_NESTING, 5000)).map(
        lambda t: _text(_mutated(t[0], DEEP).replace(json.dumps(DEEP), "[" * t[1] + "]" * t[1]))),
    st.sampled_from([dict(E=8), dict(topk=3), dict(N=32)]).map(lambda shape: _text(json.dumps(_table(**shape)))),
    st.sampled_from(["a folder", "a dangling link", "a link loop", "not UTF-8", "a FIFO", "too large"]).map(
        lambda name: NOT_TABLES[name][0]),
)


@pytest.fixture
def where(isolated_loader, tmp_path, monkeypatch):
    """A good packaged table, and the path in MOETUNE_CONFIG_DIR (looked at first) each example fills."""
    good = table_path(isolated_loader, local_device().key, **SHAPE, dtype=DTYPE)
    write_table(good, _table())
    monkeypatch.setenv(table_paths.ENV_CONFIG_DIR, str(tmp_path / "env"))
    monkeypatch.setattr(cli, "COMMANDS", {"show": cli.COMMANDS["show"]})
    return table_path(tmp_path / "env", local_device().key, **SHAPE, dtype=DTYPE), good


def _put(path, make) -> bool:
    """Replace what stands at `path` by what `make` puts there; whether that is a valid table."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    make(path)
    loader.clear_cache()
    try:
        read_record(path)
    except TableError:
        return False
    return True


def _config_warnings(call) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, loader.ConfigWarning)]


def _lookup(M: int, strict: bool | None = None):
    return loader.get_config(E, N, K, TOPK, DTYPE, M, strict=strict)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(make=CORPUS)
def test_lookup_and_show_survive_any_file(make, where, capsys):
    path, good = where
    valid = _put(path, make)

    selection, messages = _config_warnings(lambda: _lookup(5))
    skipped = [message for message in messages if "skipping it" in message]
    if valid:
        assert selection.source == str(path) and skipped == []
    else:
        assert selection.source == str(good)
        assert len(skipped) == 1 and str(path) in skipped[0] and "\n" not in skipped[0]
        assert _config_warnings(lambda: _lookup(300))[1] == []  # once

    loader.clear_cache()
    if valid:
        assert _config_warnings(lambda: _lookup(5, strict=True))[0].source == str(path)
    else:
        with pytest.raises(TableError, match=None) as raised:
            _lookup(5, strict=True)
        assert str(path) in str(raised.value)

    status = cli.main(["show"])
    out, err = capsys.readouterr()
    assert status in (0, 2) and "Traceback" not in out + err
    errors = [line for line in out.splitlines() if line.startswith("   ")]
    assert len(errors) == (0 if valid else 1)
    assert all(str(path) in line for line in errors)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(make=CORPUS)
def test_the_layer_runs_whatever_file_is_there(make, where):
    path, _ = where
    _put(path, make)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, K, generator=generator)
    w1, w2 = make_weights(E, N, K, torch.float32, generator)
    logits = torch.randn(3, E, generator=generator)
    out, messages = _config_warnings(lambda: fused_moe(x, w1, w2, logits, TOPK))
    assert len([message for message in messages if str(path) in message]) <= 1
    assert relative_error(out, fused_moe_reference(x, w1, w2, logits, TOPK)) <= TOLERANCE[torch.float32]
