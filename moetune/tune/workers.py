"""`moetune run --devices 0,1,...`: one tuning process per GPU, sharing the studies.

Each process sees only its own GPU (CUDA_VISIBLE_DEVICES) and runs the tuner, coordinated
through the storage (see run.py), in a walk order of its own (walk.py). The first listed
GPU's process also chooses the pairs and writes the tables, each batch size once its studies
settle, in moments its GPU waits for compiles, so the layer times in a table all come from
one device and that timing overlaps the other GPUs' trials. The others run trials only.
Should the writer fail, the parent writes the tables from the storage.

The workers are forked before the parent touches a GPU (ForkedWorkers), so they start with
its imports done, and start their compile processes while the parent checks the run; where
forking is not possible they are spawned.

Without a GPU the devices are labels only: each is one more process running kernels in
Triton's interpreter, which lets the CPU tests go through the same code.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

import torch

from ..device import DeviceInfo, forked_after_cuda, gpu_count, interpreter_enabled, local_device
from ..errors import RunFailure, UsageError, environment_errors, one_line

# How long the parent lets interrupted workers end their trials before stopping them.
STOP_GRACE_S = 30.0


def parse_devices(text: str) -> list[int]:
    """'0,1,3' -> [0, 1, 3]: distinct GPU indices, as CUDA numbers them here."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise UsageError(f"--devices {text!r}: use GPU indices separated by commas, e.g. 0,1")
    devices = [int(item) for item in items]
    if len(set(devices)) != len(devices):
        raise UsageError(f"--devices {text!r} names a GPU twice")
    return devices


def device_of(devices: list[int]) -> DeviceInfo:
    """The GPU model of `devices`: every listed GPU must exist and be of one model. Asks
    CUDA for the GPUs' names: call it after the workers are forked."""
    count = gpu_count()
    if count == 0 or interpreter_enabled():
        return local_device()  # interpreter processes: nothing to check
    for index in devices:
        if index >= count:
            raise UsageError(f"--devices: there is no GPU {index} (this machine has {count})")
    first = local_device(devices[0])
    for index in devices[1:]:
        name = torch.cuda.get_device_name(index)
        if name != first.name:
            raise UsageError(f"--devices: GPU {index} is {name!r} but GPU {devices[0]} is {first.name!r}: "
                             f"tune one GPU model at a time")
    return first


def visible_device(index: int) -> str | None:
    """CUDA_VISIBLE_DEVICES of a worker on GPU `index`, counted within what this process
    sees; None if it sees no such GPU (the device check refuses the run)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if before is None:
        return str(index)
    visible = before.split(",")
    return visible[index].strip() if index < len(visible) else None


@contextmanager
def _only_gpu(index: int | None):
    """Environment of a worker started inside: CUDA shows it this one GPU."""
    if index is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(index)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _work(settings, write_tables: bool, compiler=None) -> None:
    """A worker process: tune, writing the tables only if it is the writer (with `compiler`,
    compile processes started earlier, else its own)."""
    from .run import tune
    from .settings import worker_salt

    settings = replace(settings, sampler_salt=worker_salt())
    label = settings.label
    try:
        written = tune(settings, write_tables=write_tables, compiler=compiler,
                       log=lambda line: print(f"[{label}] {line}" if line.strip() else line, flush=True))
        for path in written:
            print(f"[{label}] wrote {path}", flush=True)
    except UsageError as error:
        print(f"moetune: error: [{label}] {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except environment_errors() as error:  # disk full, the storage server gone: one line each
        print(f"moetune: error: [{label}] {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


# -- workers forked early: they start with this process's imports done ---------------------------

def _wait_for_work(connection, visible: str | None, compile_workers: int, gpu: bool) -> None:
    """A forked worker: start its compile processes, wait for its settings (None: the run
    was refused), then tune."""
    from .compile_pool import compiler_for

    # OpenMP's threads do not survive a fork: a parallel CPU op would wait for them forever
    # if the parent ran one before forking. The tuner's CPU ops are small; one thread it is.
    torch.set_num_threads(1)
    if visible is not None:  # before anything here touches CUDA: its compile processes see it too
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    # They set up while the parent checks the run's settings.
    compiler = compiler_for(compile_workers, gpu) if not forked_after_cuda() else None
    if compiler is not None and gpu:
        set_cuda_up()
    try:
        job = _receive(connection)
        if job is None:
            return
        settings, write_tables = job
        if compiler is None:
            # Something in the parent initialized CUDA before the fork after all: start afresh.
            print(f"[{settings.label}] CUDA was initialized before the fork: starting a fresh process", flush=True)
            process = multiprocessing.get_context("spawn").Process(target=_work, args=(settings, write_tables))
            process.start()
            process.join()
            sys.exit(process.exitcode)
        _work(settings, write_tables, compiler)
    finally:
        if compiler is not None:
            compiler.close()


def _receive(connection):
    """The worker's (settings, write_tables), or None: the run was refused."""
    try:
        return connection.recv()
    except (EOFError, KeyboardInterrupt):
        sys.exit(130)  # the parent went away or the terminal interrupted the run
    finally:
        connection.close()


def set_cuda_up() -> None:
    """Initialize CUDA now, its compile processes forked, while the parent checks the run
    (and initializes CUDA itself): the tuner needs it first thing. A failure is left to the
    tuner, which meets it again and reports it."""
    try:
        torch.cuda.init()
    except Exception:  # noqa: BLE001 - see above
        pass


class ForkedWorkers:
    """Worker processes forked before this process touches a GPU, waiting for their settings.

    A spawned worker starts a new interpreter and imports torch, Triton and Optuna again,
    seconds that a run on several GPUs pays and a run on one does not. A forked one has
    them already; CUDA only forbids forking a process that has initialized it, so the
    parent forks first and checks its GPUs after. Each worker starts its compile processes
    at once, as a run on one GPU does, so that they set up during that check.
    """

    def __init__(self, visible: list[str | None], compile_workers: int = 0, gpu: bool = False):
        """One worker per entry of `visible`: the CUDA_VISIBLE_DEVICES it sets (None: as is)."""
        sys.stdout.flush()  # or the children would print what the parent had buffered
        sys.stderr.flush()
        context = multiprocessing.get_context("fork")
        self.workers = []
        for shown in visible:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_wait_for_work, args=(receiver, shown, compile_workers, gpu),
                                      name="moetune worker")
            process.start()
            receiver.close()
            self.workers.append((process, sender))

    def start(self, jobs: list) -> list[multiprocessing.Process]:
        """Give each worker its (settings, write_tables)."""
        for (_, sender), job in zip(self.workers, jobs):
            sender.send(job)
        return [process for process, _ in self.workers]

    def release(self) -> None:
        """Tell workers given no job to exit, and wait for them."""
        for process, sender in self.workers:
            try:
                sender.send(None)
            except OSError:
                pass  # it has its job, or is gone
            sender.close()
        for process, _ in self.workers:
            process.join()


def run_workers(settings, devices: list[int], first_writes: bool = True, log: Callable[[str], None] = print,
                forked: ForkedWorkers | None = None) -> bool:
    """Run one worker per device and wait for all; with `first_writes` the first device's
    worker writes the tables. `forked`: workers already started, one per device. Returns
    whether that writer finished. Raises when no worker finished: the studies a failed
    worker held are finished by the others."""
    jobs, labels = [], []
    for slot, index in enumerate(devices):
        label = f"gpu {index}" if settings.device.is_gpu else f"cpu worker {index}"
        worker_settings = replace(settings, label=label, bar_position=slot, walk_slot=slot, walk_count=len(devices))
        jobs.append((worker_settings, first_writes and slot == 0, index))
        labels.append(label)
    if forked is not None:
        processes = forked.start([(job_settings, writes) for job_settings, writes, _ in jobs])
    else:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked once initialized
        processes = []
        for (job_settings, writes, index), label in zip(jobs, labels):
            process = context.Process(target=_work, args=(job_settings, writes), name=f"moetune {label}")
            with _only_gpu(index if settings.device.is_gpu else None):
                process.start()
            processes.append(process)
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        # The terminal interrupted the workers too: let them end their trials, then stop them.
        for process in processes:
            process.join(timeout=STOP_GRACE_S)
            if process.is_alive():
                process.terminate()
        raise
    failed = [(label, process.exitcode) for label, process in zip(labels, processes) if process.exitcode != 0]
    for label, code in failed:
        log(f"{label}: worker exited with code {code}")
    if len(failed) == len(processes):
        if all(code == 2 for _, code in failed):
            raise UsageError("every worker refused to start (see above)")
        raise RunFailure("every worker failed (see above)")
    return first_writes and processes[0].exitcode == 0
