"""The walk orders of processes sharing a run (walk.py), and the writer that writes the
batch sizes other processes settled while it walks its own."""

import shutil
from dataclasses import replace

import pytest

from moetune.cli import build_parser
from moetune.cli.run import build_settings
from moetune.tables import read_table
from moetune.tune import tune
from moetune.tune.walk import walk_order
from moetune.types import Role
from tests.tune.conftest import QUIET, TABLE, TINY, record_walk, replace_timings

# One test worker runs the whole module: the module's walk is recorded once.
pytestmark = pytest.mark.xdist_group("walk")

SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 25])
def test_every_process_visits_every_batch_size_once(count):
    for slot in range(count):
        order = walk_order(list(reversed(SIZES)), slot, count)
        assert sorted(order) == SIZES and len(order) == len(SIZES), (slot, count)


def test_alone_the_walk_ascends():
    assert walk_order([64, 1, 8]) == [1, 8, 64]


def test_two_processes_start_at_opposite_ends_and_walk_towards_each_other():
    assert walk_order(SIZES, 0, 2) == SIZES[::-1]
    assert walk_order(SIZES, 1, 2) == SIZES


def test_each_pair_of_processes_has_a_stretch_of_its_own():
    low, high = SIZES[:10], SIZES[10:]
    first, second, third = (walk_order(SIZES, slot, 3) for slot in range(3))
    assert first[:10] == low[::-1] and second[:10] == low
    assert third[:10] == high  # alone in its stretch: upwards
    # Then the rest, nearest to where the process stopped first.
    assert first[10:] == high and second[10:] == high and third[10:] == low[::-1]
    # Four processes: two pairs, no batch size at the start of two walks.
    starts = [walk_order(SIZES, slot, 4)[0] for slot in range(4)]
    assert len(set(starts)) == 4


def test_more_processes_than_batch_sizes_still_visit_them_all():
    assert sorted(walk_order([1, 8], 3, 4)) == [1, 8]


@pytest.mark.parametrize("slot, count", [(2, 2), (-1, 2), (0, 0)])
def test_a_slot_outside_the_run_is_refused(slot, count):
    with pytest.raises(ValueError, match="walk slot"):
        walk_order(SIZES, slot, count)


G1, G2 = Role.GEMM1, Role.GEMM2_UNFUSED


def settings_of(*args: str):
    settings, _ = build_settings(build_parser().parse_args(["run", *TINY, "--trials", "1", "--variants", "unfused",
                                                            *QUIET, *args]))
    return settings


@pytest.fixture(scope="module")
def settled_by_a_worker(tmp_path_factory):
    """An out-dir whose studies of M=1 a worker settled, writing no table."""
    out_dir = tmp_path_factory.mktemp("worker")
    with pytest.MonkeyPatch.context() as patch:
        replace_timings(patch)
        worker = settings_of("--batch-sizes", "1", "--worker", "--out-dir", str(out_dir))
        assert tune(worker, log=lambda line: None, write_tables=False) == []
    assert not (out_dir / "cpu" / TABLE).exists()
    return out_dir


@pytest.fixture
def walk_events(monkeypatch, made_up_timings) -> list:
    return record_walk(monkeypatch)


def test_the_writer_writes_batch_sizes_others_settled_before_its_walk_reaches_them(settled_by_a_worker, tmp_path,
                                                                                    walk_events):
    """A worker settled M=1; the writer, walking down from M=8, writes M=1 as soon as its own
    M=8 is done, before it goes on to M=4 (and it never visits M=1). Its own M=8 it writes
    at once too: with other GPUs' workers, a write put off is one left for the end."""
    shutil.copytree(settled_by_a_worker, tmp_path / "tables")
    writer = settings_of("--batch-sizes", "1,4,8", "--out-dir", str(tmp_path / "tables"))
    writer = replace(writer, walk_slot=0, walk_count=2)  # the first of two: walks down from M=8
    written = tune(writer, log=lambda line: None)
    assert walk_events == [("trial", G1, 8), ("trial", G2, 8), ("write", 1), ("write", 8),
                           ("trial", G1, 4), ("trial", G2, 4), ("write", 4)]
    assert written == [tmp_path / "tables" / "cpu" / TABLE]
    assert sorted(read_table(written[0])["batch_sizes"]) == [1, 4, 8]


def test_in_its_idle_moments_the_writer_writes_a_batch_size_others_settled(settled_by_a_worker, tmp_path,
                                                                            walk_events, held_compiler):
    shutil.copytree(settled_by_a_worker, tmp_path / "tables")
    writer = settings_of("--batch-sizes", "1,8", "--out-dir", str(tmp_path / "tables"))
    # M=8's trials compile until the writer waits for them.
    tune(writer, log=lambda line: None, compiler=held_compiler(2, writer))
    assert walk_events.index(("write", 1)) < walk_events.index(("trial", G1, 8))
    assert sorted(read_table(tmp_path / "tables" / "cpu" / TABLE)["batch_sizes"]) == [1, 8]
