"""`moetune run`: check every input first (one-line errors, nothing written), then tune.

One process tunes on one GPU by default; `--devices 0,1` runs one worker per GPU sharing the
studies, and `--worker` (on any number of hosts sharing a --storage) tunes without writing
tables, which `moetune collect` writes afterwards."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..device import fork_is_safe, gpu_count, interpreter_enabled, local_device
from ..errors import UsageError
from ..types import Variant
from ..tune.space import load_space
from ..tune.workers import device_of, parse_devices, visible_device
from .flags import (add_run_arguments, baseline_folder, check_memory, check_out_dir, check_storage, parse_variants,
                    resolve_gpu, resolve_table_dtype, shapes_and_batch_sizes)

# More compile processes than this per GPU only queue for the cores.
MAX_COMPILE_WORKERS = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="stop sampling when this many minutes are spent (shared over all studies)")
    parser.add_argument("--baseline-configs", default=None, metavar="DIR",
                        help="folder of vLLM/SGLang config files to warm-start from")
    parser.add_argument("--compile-workers", type=int, default=None,
                        help="processes compiling candidates ahead, per GPU (default: the CPU cores "
                             "shared by the --devices, at most 16 per GPU)")
    parser.add_argument("--devices", default=None, metavar="0,1,...",
                        help="GPUs to tune on, one worker process each, sharing the studies (default: the "
                             "current GPU); without a GPU, each is one more interpreter process")
    parser.add_argument("--worker", action="store_true",
                        help="run trials only and write no table: for several hosts sharing a --storage, "
                             "after which `moetune collect` writes the tables")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_settings(args: argparse.Namespace):
    """(settings, devices): devices is None without --devices. Checks every input, and asks
    CUDA about the GPUs: call it after any process is forked."""
    from ..tune import TuneSettings
    from ..tune.settings import local_shape

    shapes, batch_sizes = shapes_and_batch_sizes(args)
    shapes = [local_shape(shape, args.ep_size) for shape in shapes]
    variants = parse_variants(args.variants)
    if args.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {args.trials}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise UsageError(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    if args.heartbeat < 1:
        raise UsageError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    devices = parse_devices(args.devices) if args.devices is not None else None
    device = resolve_gpu(args.gpu, device_of(devices) if devices else local_device())
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir)
    if args.storage:
        check_storage(args.storage)
    baseline = baseline_folder(args.baseline_configs)
    # The interpreter's timings mean nothing to choose switches by: there, by default, only
    # those a space file names are tried (which is how tests cover the search).
    space = load_space(args.space, default_switches=args.switches == "search" or
                       (args.switches is None and device.is_gpu))
    if args.switches == "off":
        space = space.without_switches()
    dtype, activations = resolve_table_dtype(args.dtype, args.block_shape, shapes, device,
                                             atomics=Variant.FUSED in variants)
    check_memory(shapes, batch_sizes, activations, device, processes=len(devices or [0]))
    workers = compile_workers(args.compile_workers, len(devices or [0]))
    settings = TuneSettings(shapes=shapes, dtype=dtype, fp8_activations=activations, batch_sizes=batch_sizes,
                            variants=variants,
                            trials=args.trials, out_dir=out_dir, device=device, space=space, seed=args.seed,
                            storage=args.storage, time_budget_min=args.time_budget, baseline_dir=baseline,
                            compile_workers=workers, progress=not args.no_progress, heartbeat_s=args.heartbeat,
                            retime=args.retime, ep_size=args.ep_size,
                            # The interpreter's timings mean nothing: keep the final layer stage short.
                            top_pairs=3 if device.is_gpu else 2, retime_rounds=3 if device.is_gpu else 1)
    settings.check_tables_agree()
    return settings, devices


def compile_workers(requested: int | None, gpus: int) -> int:
    """--compile-workers, or its default for `gpus` GPUs sharing this machine's cores."""
    workers = requested if requested is not None else default_compile_workers(os.cpu_count() or 1, gpus)
    if not 0 <= workers <= MAX_COMPILE_WORKERS:
        raise UsageError(f"--compile-workers must be between 0 and {MAX_COMPILE_WORKERS}, got {workers}")
    return workers


def default_compile_workers(cpu_cores: int, gpus: int) -> int:
    """Compile processes per GPU's tuner: that GPU's share of the cores, at most 16; on one
    core, none (compile inline). Compiling, not the GPU, bounds much of a tune. The compile
    processes run at a lower priority than the tuners, which need no core of their own: a
    tuner mostly waits, for its GPU or for them."""
    if cpu_cores <= 1:
        return 0
    return max(1, min(16, cpu_cores // gpus))


def use_gpu(settings, index: int | None) -> None:
    """Run this process's kernels on GPU `index` (of --devices)."""
    if index is not None and settings.device.is_gpu:
        torch.cuda.set_device(index)


def main(args: argparse.Namespace) -> int:
    from ..tune.workers import ForkedWorkers

    # Several GPUs: start their workers before this process touches one (see ForkedWorkers),
    # each with its compile processes.
    devices = parse_devices(args.devices) if args.devices is not None else [None]
    forked = None
    if len(devices) > 1 and fork_is_safe():
        gpu = _has_gpu()
        forked = ForkedWorkers([visible_device(index) if gpu else None for index in devices],
                               _early_compile_workers(args, len(devices)), gpu)
    # One process: its compile processes start now, forked before it touches the GPU.
    compiler = _early_compiler(args) if len(devices) == 1 else None
    try:
        return _run(args, forked, compiler)
    finally:
        if forked is not None:
            forked.release()
        if compiler is not None:
            compiler.close()


def _has_gpu() -> bool:
    """Whether kernels will run on a GPU, asked of NVML: CUDA stays untouched here."""
    return gpu_count() > 0 and not interpreter_enabled()


def _early_compile_workers(args: argparse.Namespace, gpus: int) -> int:
    """--compile-workers or its default, before the settings are checked; 0 if it is bad
    (the check then says so)."""
    try:
        return compile_workers(args.compile_workers, gpus)
    except UsageError:
        return 0


def _early_compiler(args: argparse.Namespace):
    """The tuner's compiler, started before the settings are checked (which touches CUDA)."""
    from ..tune.compile_pool import compiler_for

    return compiler_for(_early_compile_workers(args, 1), _has_gpu())


def _run(args: argparse.Namespace, forked, compiler) -> int:
    settings, devices = build_settings(args)
    from ..tune import tune

    names = ", ".join(s.describe() for s in settings.shapes)
    if settings.ep_size > 1:
        names += f" on one of {settings.ep_size} expert-parallel ranks"
    print(f"tuning {names} on {settings.device.name}, {settings.dtype}, batch sizes "
          f"{','.join(map(str, settings.batch_sizes))}, variants {','.join(settings.variants)}, "
          f"{settings.trials} trials per role and batch size")
    if not settings.device.is_gpu:
        print("no GPU: kernels run in Triton's interpreter; the timings will mean nothing")
    if devices is not None and len(devices) > 1:
        kind = "GPUs" if settings.device.is_gpu else "interpreter processes"
        print(f"{len(devices)} workers ({kind} {','.join(map(str, devices))}) share the studies")
    if args.worker:
        print("worker: runs trials only and writes no table (`moetune collect` writes them)")
    if devices is not None and len(devices) > 1:
        from ..tune.workers import run_workers

        if run_workers(settings, devices, first_writes=not args.worker, forked=forked) or args.worker:
            return 0  # the first worker wrote the tables and said so
        print("the first worker did not finish: writing the tables from the studies here")
        # The pairs are timed on one GPU only, so that all layer times in a table compare.
        use_gpu(settings, devices[0])
        from ..tune import collect

        written = collect(settings, allow_incomplete=True)
    else:
        use_gpu(settings, devices[0] if devices else None)
        if args.worker:
            from ..tune.settings import worker_salt

            tune(replace(settings, sampler_salt=worker_salt()), write_tables=False, compiler=compiler)
            return 0
        written = tune(settings, compiler=compiler)
    for path in written:
        print(f"wrote {path}")
    return 0
