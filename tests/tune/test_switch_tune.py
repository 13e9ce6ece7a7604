"""The switch search through `moetune run` on the interpreter: what the table records, the
correctness gate every switch set passes, the layers compiled ahead, --switches off, and an
unchanged rerun.

Timings are made up (conftest.replace_timings) and steered per switch: the fused SiLU is
the fastest layer, split-K slow, and the sorted rows both the fastest and wrong (their
GEMM 2 output is corrupted), so the gate alone keeps them out.
"""

import importlib
import shutil
from concurrent.futures import Future

import pytest

import moetune.tune.compile_pool as compile_pool
from moetune.switch_candidates import candidates_of
from moetune.tables import read_table
from moetune.tune import Compiler
from moetune.tune.inputs import BatchBench
from moetune.types import OFF, Switches
from tests.tune.conftest import JOURNAL, TABLE, TINY, figure, replace_timings, studies_in
from tests.tune.test_run import run_cli

# One BLOCK_SIZE_K of 16: GEMM 1's 4 K tiles and GEMM 2's 2 split evenly in two. Three
# switch sets are tried (each check costs the interpreter a second or two): split-K 2, the
# fused SiLU, then the sorted rows on top of it. The TMA loads and the persistent schedule
# run in tests/test_kernel_switches.py; their rules are in test_switch_space.py.
SPACE = ("BLOCK_SIZE_M: [16]\nBLOCK_SIZE_N: [32]\nBLOCK_SIZE_K: [16]\nGROUP_SIZE_M: [1]\nnum_warps: [4]\n"
         "num_stages: [2]\nswitches: {split_k: [1, 2], tma_activations: [false], tma_weights: [false], "
         "persistent: [false]}\n")
ARGS = [*TINY, "--batch-sizes", "1", "--trials", "1", "--variants", "unfused"]


def steered_time(self, variant, gemm1, gemm2, switches=OFF):
    if switches.sorted_rows:
        return 0.5
    if switches.fuse_activation:
        return 1.0
    return (5000.0 if switches.split_k > 1 else 100.0) + figure(variant, gemm1, gemm2, switches)


class LayerRecorder(Compiler):
    """No compile processes (the interpreter compiles when it launches); records the switch
    layers handed to them, each as (variant, switches, GEMM 1, GEMM 2), in turn."""

    layers: list = []

    def __init__(self, workers: int):
        super().__init__(0)
        LayerRecorder.layers = []

    def submit_layer(self, request):
        LayerRecorder.layers.append((request.variant, request.switches, request.gemm1, request.gemm2))
        future = Future()
        future.set_result(0.0)
        return future


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("switch_tune")
    (out_dir / "space.yaml").write_text(SPACE)
    experts = importlib.import_module("moetune.kernels.experts")  # where the layer launches its GEMMs
    real = experts.grouped_gemm

    def corrupting(a, weights, out, aligned, config, **kwargs):
        result = real(a, weights, out, aligned, config, **kwargs)
        if kwargs.get("a_sorted"):
            out.mul_(1.5)
        return result

    with pytest.MonkeyPatch.context() as patch:
        replace_timings(patch)
        patch.setattr(BatchBench, "time_layer", steered_time)
        patch.setattr(experts, "grouped_gemm", corrupting)
        patch.setattr(compile_pool, "compiler_for", lambda workers, gpu: LayerRecorder(workers))
        code, output = run_cli(*ARGS, "--space", str(out_dir / "space.yaml"), "--switches", "search",
                               "--out-dir", str(out_dir))
    assert code == 0, output
    return out_dir, LayerRecorder.layers


@pytest.fixture
def tuned_copy(tuned, tmp_path):
    shutil.copytree(tuned[0], tmp_path / "tables")
    return tmp_path / "tables"


def test_the_table_records_the_fastest_switches_that_pass_the_gate_and_every_candidate(tuned):
    entries = read_table(tuned[0] / "cpu" / TABLE)["batch_sizes"]
    assert list(entries) == [1]
    for entry in entries.values():
        record = entry["unfused"]
        assert Switches.from_json(record["switches"]) == Switches(fuse_activation=True)
        candidates = candidates_of(entry)
        assert candidates[0].switches == OFF and candidates[0].measured  # the plain layer, always measured
        by_switches = {c.switches: c for c in candidates}
        chosen = by_switches[Switches(fuse_activation=True)]
        assert chosen.measured and [*chosen.gemm1.to_json().values()] == [*record["gemm1"].values()]
        sorted_rows = [c for c in candidates if c.switches.sorted_rows]
        assert sorted_rows and all(c.status == "wrong_result" and c.layer_us is None for c in sorted_rows)
        # Split-K is tried (GEMM 1's 4 output tiles leave the interpreter's 4 "SMs" short) and loses.
        assert by_switches[Switches(split_k=2)].measured
        assert set(by_switches) == {OFF, Switches(split_k=2), Switches(fuse_activation=True),
                                    Switches(fuse_activation=True, sorted_rows=True)}


def test_restricted_to_all_off_the_table_holds_all_off_switches(tuned_copy, monkeypatch):
    """A rerun in another switch space chooses the pairs again, from the same studies."""
    replace_timings(monkeypatch)
    journal = str(tuned_copy / "cpu" / JOURNAL)
    trials = {name: len(t) for name, t in studies_in(journal).items()}
    code, output = run_cli(*ARGS, "--space", str(tuned_copy / "space.yaml"), "--switches", "off",
                           "--out-dir", str(tuned_copy))
    assert code == 0 and f"wrote {tuned_copy / 'cpu' / TABLE}" in output
    for entry in read_table(tuned_copy / "cpu" / TABLE)["batch_sizes"].values():
        assert entry["unfused"]["switches"] == {} and candidates_of(entry) == []
    assert {name: len(t) for name, t in studies_in(journal).items()} == trials


def test_an_unchanged_rerun_rewrites_nothing(tuned_copy):
    table = tuned_copy / "cpu" / TABLE
    before = (table.read_bytes(), table.stat().st_mtime_ns)
    code, output = run_cli(*ARGS, "--space", str(tuned_copy / "space.yaml"), "--switches", "search",
                           "--out-dir", str(tuned_copy))
    assert code == 0 and "nothing left to do" in output
    assert (table.read_bytes(), table.stat().st_mtime_ns) == before


def test_every_switch_layer_checked_was_compiled_ahead(tuned):
    """Each family's layer on top of the all-off pair as soon as the pair is chosen, and, once
    the fused SiLU is adopted, the sorted rows on top of it."""
    out_dir, submitted = tuned
    candidates = candidates_of(read_table(out_dir / "cpu" / TABLE)["batch_sizes"][1])
    checked = [(c.variant, c.switches, c.gemm1, c.gemm2) for c in candidates if c.switches != OFF]
    assert len(checked) == 3 and set(checked) <= set(submitted)
    assert [layer[1] for layer in submitted] == [Switches(split_k=2), Switches(fuse_activation=True),
                                                 Switches(sorted_rows=True),
                                                 Switches(fuse_activation=True, sorted_rows=True)]
