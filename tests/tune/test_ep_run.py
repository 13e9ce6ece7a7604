"""`moetune run --ep-size R`: one expert-parallel rank's local shape (E/R experts) tuned with
the routing over all E experts, its table named by the local shape and saying so in its
header, and the layer serving a rank (fused_experts with an expert_map) from it."""

import importlib

import pytest
import torch

from moetune import fused_experts, get_config
from moetune.cli import main
from moetune.expert_map import local_expert_ids, rank_expert_map
from moetune.loader import clear_cache
from moetune.reference import TOLERANCE, moe_reference, relative_error
from moetune.tables import read_record
from tests.tune.conftest import QUIET, TINY, replace_timings

# One test worker runs the module: its tune runs once.
pytestmark = pytest.mark.xdist_group("ep_run")

LOCAL_TABLE = "E=2,N=32,K=64,topk=2,dtype=fp16.json"  # TINY has E=4: two ranks of two experts


@pytest.mark.parametrize("ep_size, words", [
    ("0", "--ep-size must be a positive integer, got 0"),
    ("-2", "--ep-size must be a positive integer, got -2"),
    ("3", "--ep-size 3 does not divide the 4 experts of"),
    ("4", "--ep-size 4: 4 experts / 4 = 1 per rank, fewer than top-k 2"),
])
def test_bad_ep_sizes_are_one_line_before_any_work(ep_size, words, tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["run", *TINY, "--ep-size", ep_size, "--out-dir", str(out), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetune: error: ") and err.count("\n") == 1 and words in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def ep_table(tmp_path_factory):
    """A tiny tune of one rank of two (E 4 -> 2 local) in the interpreter, made-up timings."""
    monkeypatch = pytest.MonkeyPatch()
    replace_timings(monkeypatch)
    out = tmp_path_factory.mktemp("ep") / "tables"
    try:
        code = main(["run", *TINY, "--ep-size", "2", "--batch-sizes", "6", "--trials", "2",
                     "--out-dir", str(out), *QUIET])
    finally:
        monkeypatch.undo()
    assert code == 0
    return out


def test_an_ep_tune_writes_the_local_shape_s_table_with_the_ranks_in_its_header(ep_table):
    table = read_record(ep_table / "cpu" / LOCAL_TABLE)
    assert (table.shape.E, table.shape.topk) == (2, 2)
    assert table.shape.expert_parallel == (2, 4)
    assert table.shape.to_json()["ep_size"] == 2 and table.shape.to_json()["global_E"] == 4
    assert set(table.batch_sizes[6].variants) == {"unfused", "fused"}


def test_a_run_into_a_table_of_another_ep_size_is_refused_before_any_work(ep_table, capsys):
    before = (ep_table / "cpu" / LOCAL_TABLE).read_bytes()
    # The same file name: a layer of 2 experts without expert parallelism.
    code = main(["run", "--E", "2", "--topk", "2", "--hidden", "64", "--intermediate", "32",
                 "--batch-sizes", "6", "--out-dir", str(ep_table), *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--ep-size 2 (global E 4)" in err and "no --ep-size" in err, err
    assert (ep_table / "cpu" / LOCAL_TABLE).read_bytes() == before


def test_a_rank_called_with_an_expert_map_runs_the_ep_table(ep_table, monkeypatch, isolated_loader, poison_empty):
    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(ep_table))
    clear_cache()
    path = ep_table / "cpu" / LOCAL_TABLE
    selection = get_config(2, 32, 64, 2, "fp16", 6)
    assert selection.source == str(path) and selection.batch_size == 6

    launched = []
    experts = importlib.import_module("moetune.kernels.experts")  # where the layer's kernels are launched
    real = experts.grouped_gemm
    monkeypatch.setattr(experts, "grouped_gemm",
                        lambda *args, **kwargs: launched.append(dict(args[4])) or real(*args, **kwargs))
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=generator).half()
    w1 = (torch.randn(2, 64, 64, generator=generator) / 8).half()
    w2 = (torch.randn(2, 64, 32, generator=generator) / 6).half()
    weights, ids = torch.softmax(torch.randn(6, 4, generator=generator), -1).topk(2)
    expert_map = rank_expert_map(2, 4, rank=1)  # the second rank: experts 2 and 3
    out = fused_experts(x, w1, w2, weights, ids.int(), expert_map=expert_map, global_num_experts=4)
    winner = selection.variant
    entry = read_record(path).batch_sizes[6].variants[winner]
    assert launched == [entry.gemm1.to_json(), entry.gemm2.to_json()]
    reference = moe_reference(x, w1, w2, weights, local_expert_ids(ids, expert_map))
    assert relative_error(out, reference) <= TOLERANCE[torch.float16]
