"""The walk orders of processes sharing a run (walk.py), and the writer that writes the
batch sizes other processes settled while it walks its own."""

from dataclasses import replace

import pytest

from moetune.tune import run as tune_module
from moetune.cli import build_parser
from moetune.tables import read_table
from moetune.cli.run import build_settings
from moetune.tune.walk import walk_order

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


TINY = ["--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32", "--trials", "2", "--no-progress",
        "--compile-workers", "0"]
TABLE = "E=4,N=32,K=64,topk=2,dtype=fp16.json"


def record_walk(monkeypatch) -> list:
    """("tune", M, role) for each study run and ("write", M) for each batch size written."""
    events = []
    real_run, real_write = tune_module.RoleStudy.run, tune_module.TuningRun._write

    def run(runner, *args, **kwargs):
        events.append(("tune", runner.M, runner.role))
        return real_run(runner, *args, **kwargs)

    monkeypatch.setattr(tune_module.RoleStudy, "run", run)
    monkeypatch.setattr(tune_module.TuningRun, "_write",
                        lambda run, shape, M: events.append(("write", M)) or real_write(run, shape, M))
    return events


ROLES = ["gemm1", "gemm2_unfused", "gemm2_fused"]


def test_the_writer_writes_batch_sizes_others_settled_before_its_walk_reaches_them(tmp_path, monkeypatch):
    """A worker settles M=1; the writer, walking down from M=8, writes M=1 right after its own
    M=8, before it visits M=1 and before it waits for anything. Its own M=8 it writes at once
    too: with other GPUs' workers, a write put off is one left for the end."""
    parser = build_parser()
    worker_args = parser.parse_args(["run", *TINY, "--batch-sizes", "1", "--worker", "--out-dir", str(tmp_path)])
    worker, _ = build_settings(worker_args)
    assert tune_module.tune(worker, log=lambda line: None, write_tables=False) == []

    writer_args = parser.parse_args(["run", *TINY, "--batch-sizes", "1,8", "--out-dir", str(tmp_path)])
    writer, _ = build_settings(writer_args)
    writer = replace(writer, walk_slot=0, walk_count=2)  # the first of two: walks down from M=8
    events = record_walk(monkeypatch)
    written = tune_module.tune(writer, log=lambda line: None)

    assert events == [*[("tune", 8, role) for role in ROLES], ("write", 1), ("write", 8),
                      *[("tune", 1, role) for role in ROLES]]
    assert written == [tmp_path / "cpu" / TABLE]
    assert sorted(read_table(written[0])["batch_sizes"]) == [1, 8]


def test_alone_the_walk_leaves_the_batch_size_just_tuned_for_the_next_one_s_idle_moments(tmp_path, monkeypatch):
    """Alone, M=1 is written only after M=8's trials (in whose idle moments it would have
    been, had there been compile processes to wait for)."""
    args = build_parser().parse_args(["run", *TINY, "--batch-sizes", "1,8", "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    events = record_walk(monkeypatch)
    tune_module.tune(settings, log=lambda line: None)
    assert events == [*[("tune", 1, role) for role in ROLES], *[("tune", 8, role) for role in ROLES],
                      ("write", 1), ("write", 8)]


def test_in_its_idle_moments_the_writer_writes_a_batch_size_others_settled(tmp_path):
    parser = build_parser()
    worker_args = parser.parse_args(["run", *TINY, "--batch-sizes", "1", "--worker", "--out-dir", str(tmp_path)])
    worker, _ = build_settings(worker_args)
    assert tune_module.tune(worker, log=lambda line: None, write_tables=False) == []

    writer, _ = build_settings(parser.parse_args(["run", *TINY, "--batch-sizes", "1,8", "--out-dir", str(tmp_path)]))
    run = tune_module.TuningRun(writer, tune_module._checked_storage(writer), lambda line: None, True,
                                tune_module.Compiler(0))
    try:
        assert run._use_idle_moment([])  # M=1, settled by the worker
        assert sorted(read_table(tmp_path / "cpu" / TABLE)["batch_sizes"]) == [1]
        assert not run._use_idle_moment([])  # looked a moment ago
        run.next_look = 0.0
        assert not run._use_idle_moment([])  # M=8: nobody has tuned it
    finally:
        run.close()

    reader, _ = build_settings(parser.parse_args(["run", *TINY, "--batch-sizes", "1", "--out-dir", str(tmp_path / "w")]))
    run = tune_module.TuningRun(reader, tune_module._checked_storage(reader), lambda line: None, False,
                                tune_module.Compiler(0))
    try:
        assert not run._use_idle_moment([])  # a worker writes no table
    finally:
        run.close()
