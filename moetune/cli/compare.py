"""`moetune compare`: the whole layer timed per contender (tuned unfused, fused, the
dispatcher's pick, the default heuristic, a vLLM/SGLang baseline); every flag checked, the
--out folder included, before anything runs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..compare import CompareSettings, measure_shape, plan_shape
from ..compare_output import PLOTS_NEED_MATPLOTLIB, plots_available, report_text, write_results
from ..device import local_device
from ..errors import UsageError
from .flags import (add_workload_arguments, baseline_folder, check_out_dir, resolve_dtype, resolve_gpu,
                    shapes_and_batch_sizes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser, "GPU to compare on; must match the local one (default: auto)")
    parser.add_argument("--baseline-configs", default=None, metavar="DIR|NAME",
                        help="vLLM/SGLang configs to add as a contender: a folder of their files (see `moetune "
                             "import`) or the name of a baseline packaged with moetune (sglang-vllm-h200)")
    parser.add_argument("--out", default="compare",
                        help="folder for the CSV and JSON files, and two PNG plots per shape when matplotlib is "
                             "installed (pip install 'moetune[plots]'; without it, a note and no plots) "
                             "(default ./compare)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per batch size, median kept (default 3 on a GPU, 1 without)")


def build_settings(args: argparse.Namespace) -> CompareSettings:
    """Check every flag; raises UsageError before anything runs or is written."""
    shapes, batch_sizes = shapes_and_batch_sizes(args)
    device = resolve_gpu(args.gpu, local_device())
    out_dir = Path(args.out)
    check_out_dir(out_dir, flag="--out")
    baseline_dir = baseline_folder(args.baseline_configs)
    dtype = resolve_dtype(args.dtype, device, atomics=True)  # the fused contender always runs
    rounds = args.rounds if args.rounds is not None else (3 if device.is_gpu else 1)
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    return CompareSettings(shapes=shapes, dtype=dtype, batch_sizes=batch_sizes, device=device, out_dir=out_dir,
                           baseline_dir=baseline_dir, seed=args.seed, tp_size=args.tp_size,
                           command_line=command_line(args), rounds=rounds, plots=plots_available())


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed flags."""
    flags = [("--model", args.model), ("--model-config", args.model_config), ("--E", args.E), ("--topk", args.topk),
             ("--hidden", args.hidden), ("--intermediate", args.intermediate), ("--tp-size", args.tp_size),
             ("--gpu", args.gpu), ("--dtype", args.dtype), ("--batch-sizes", args.batch_sizes),
             ("--baseline-configs", args.baseline_configs), ("--out", args.out), ("--seed", args.seed),
             ("--rounds", args.rounds)]
    words = ["moetune", "compare"]
    for flag, value in flags:
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def main(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    plans = [plan_shape(shape, settings) for shape in settings.shapes]

    if not settings.plots:
        print(f"moetune: note: {PLOTS_NEED_MATPLOTLIB}; writing the CSV and JSON files only", file=sys.stderr)
    print(f"comparing on {settings.device.name}, {settings.dtype}, "
          f"batch sizes {','.join(map(str, settings.batch_sizes))}")
    if not settings.device.is_gpu:
        print("no GPU: kernels run in Triton's interpreter; these timings mean nothing about speed")
    results = []
    for plan in plans:
        result = measure_shape(plan, settings)
        print()
        print(report_text(result, settings), end="")
        results.append(result)

    for path in write_results(results, settings):
        print(f"wrote {path}")
    failed = [failure for result in results for failure in result.failures()]
    if failed:
        where = ", ".join(failed[:6]) + (" ..." if len(failed) > 6 else "")
        print(f"moetune: error: relative error above tolerance: {where}", file=sys.stderr)
        return 1
    return 0
