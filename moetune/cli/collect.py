"""`moetune collect`: write the tables from a storage that `moetune run --worker` filled.

Takes the arguments that name the run (shape, --dtype, --batch-sizes, --variants, --trials,
--storage) as the workers were given them. Refuses, in one line, while a study is short of
its trials or still has some running, and where the storage holds no studies at all. The
pair choice runs here, on the local GPU (or the interpreter without one), so every layer
time in a table comes from one device; an entry already written from the same studies is
left as it is (--retime chooses its pairs again).
"""

from __future__ import annotations

import argparse

from .flags import add_run_arguments
from .run import build_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="write studies that stopped short of --trials too (a time budget does that)")
    # `run` options that do not apply to collecting.
    parser.set_defaults(time_budget=None, baseline_configs=None, compile_workers=0, devices=None, worker=False,
                        no_progress=True)


def main(args: argparse.Namespace) -> int:
    settings, _ = build_settings(args)
    from ..tune import collect

    print(f"collecting the studies of {', '.join(s.describe() for s in settings.shapes)} on {settings.device.name}")
    written = collect(settings, allow_incomplete=args.allow_incomplete)
    for path in written:
        print(f"wrote {path}")
    return 0
