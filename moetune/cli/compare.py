"""`moetune compare`: the whole layer timed per contender (tuned unfused, fused, the
dispatcher's pick, the default heuristic, a vLLM/SGLang baseline; with fp8 weights the fp8
layer, the unquantized one and the shipped fp8 configs), and the anchor figures where the
device and shape have them; every flag checked, the --out folder included, before anything
runs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..compare import CompareSettings, measure_shape, plan_shape
from ..compare_output import PLOTS_NEED_MATPLOTLIB, plots_available, report_text, write_results
from ..device import local_device
from ..errors import UsageError
from ..tables import FP8_W8A8
from .flags import (add_block_shape_argument, add_workload_arguments, baseline_folder, check_out_dir,
                    resolve_gpu, resolve_table_dtype, shapes_and_batch_sizes)

# Where an fp8 comparison looks for the frameworks' shipped fp8 configs unless told.
FP8_BASELINE = "sglang-vllm-h200"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser, "GPU to compare on; must match the local one (default: auto)",
                           dtypes=("bf16", "fp16", FP8_W8A8))
    add_block_shape_argument(parser)
    parser.add_argument("--baseline-configs", default=None, metavar="DIR|NAME",
                        help="vLLM/SGLang configs to add as a contender: a folder of their files (see `moetune "
                             f"import`) or the name of a baseline packaged with moetune ({FP8_BASELINE}); with "
                             f"--dtype {FP8_W8A8}, their fp8 files of the same block shape (default "
                             f"{FP8_BASELINE}). An anchors.json in the folder gives the anchor figures reported "
                             f"beside the dispatcher (default: those packaged with moetune, SGLang's best path on "
                             f"the H200)")
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
    # The fused contender always runs; fp8 compares with its activations' dtype.
    table_dtype, activations = resolve_table_dtype(args.dtype, args.block_shape, shapes, device, atomics=True)
    baseline_dir = baseline_folder(args.baseline_configs or (FP8_BASELINE if table_dtype.fp8 else None))
    rounds = args.rounds if args.rounds is not None else (3 if device.is_gpu else 1)
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    return CompareSettings(shapes=shapes, dtype=table_dtype.name, batch_sizes=batch_sizes, device=device,
                           out_dir=out_dir, baseline_dir=baseline_dir, seed=args.seed, tp_size=args.tp_size,
                           command_line=command_line(args), rounds=rounds, plots=plots_available(),
                           block_shape=table_dtype.block_shape, activations=activations if table_dtype.fp8 else None)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed flags."""
    flags = [("--model", args.model), ("--model-config", args.model_config), ("--E", args.E), ("--topk", args.topk),
             ("--hidden", args.hidden), ("--intermediate", args.intermediate), ("--tp-size", args.tp_size),
             ("--gpu", args.gpu), ("--dtype", args.dtype), ("--block-shape", args.block_shape),
             ("--batch-sizes", args.batch_sizes),
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
    print(f"comparing on {settings.device.name}, {settings.table_dtype}, "
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
