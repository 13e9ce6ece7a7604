"""`moetune run --devices 0,1,...`: one tuning process per GPU, sharing the studies.

Each process sees only its own GPU (CUDA_VISIBLE_DEVICES) and runs the tuner, coordinated
through the storage (see tune.py), in a walk order of its own (walk.py). The first listed GPU's process also chooses the pairs and
writes the tables, each batch size as soon as its studies settle, so the layer times in a
table all come from one device and that timing overlaps the other GPUs' trials. The others
run trials only. Should the writer fail, the parent writes the tables from the storage.

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

from .device import DeviceInfo, interpreter_enabled, local_device
from .errors import UsageError

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
    """The GPU model of `devices`: every listed GPU must exist and be of one model."""
    if not torch.cuda.is_available() or interpreter_enabled():
        return local_device()  # interpreter processes: nothing to check
    count = torch.cuda.device_count()
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


@contextmanager
def _only_gpu(index: int | None):
    """Environment of a worker started inside: CUDA shows it this one GPU."""
    if index is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if before is not None:  # the indices count within what this process was already given
        index = before.split(",")[index].strip()
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _work(settings, write_tables: bool) -> None:
    """A worker process: tune, writing the tables only if it is the writer."""
    from .tune import tune, worker_salt

    settings = replace(settings, sampler_salt=worker_salt())
    label = settings.label
    try:
        written = tune(settings, write_tables=write_tables,
                       log=lambda line: print(f"[{label}] {line}" if line.strip() else line, flush=True))
        for path in written:
            print(f"[{label}] wrote {path}", flush=True)
    except UsageError as error:
        print(f"moetune: error: [{label}] {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(settings, devices: list[int], first_writes: bool = True, log: Callable[[str], None] = print) -> bool:
    """Run one worker per device and wait for all; with `first_writes` the first device's
    worker writes the tables. Returns whether that writer finished. Raises when no worker
    finished: the studies a failed worker held are finished by the others."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    processes = []
    for slot, index in enumerate(devices):
        label = f"gpu {index}" if settings.device.is_gpu else f"cpu worker {index}"
        worker_settings = replace(settings, label=label, bar_position=slot, walk_slot=slot, walk_count=len(devices))
        writes = first_writes and slot == 0
        process = context.Process(target=_work, args=(worker_settings, writes), name=f"moetune {label}")
        with _only_gpu(index if settings.device.is_gpu else None):
            process.start()
        processes.append((label, process))
    try:
        for _, process in processes:
            process.join()
    except KeyboardInterrupt:
        # The terminal interrupted the workers too: let them end their trials, then stop them.
        for _, process in processes:
            process.join(timeout=STOP_GRACE_S)
            if process.is_alive():
                process.terminate()
        raise
    failed = [(label, process.exitcode) for label, process in processes if process.exitcode != 0]
    for label, code in failed:
        log(f"{label}: worker exited with code {code}")
    if len(failed) == len(processes):
        if all(code == 2 for _, code in failed):
            raise UsageError("every worker refused to start (see above)")
        raise RuntimeError("every worker failed (see above)")
    return first_writes and processes[0][1].exitcode == 0
