"""`moetune import`: read vLLM/SGLang config files into a folder for --baseline-configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..export import plan_import, write_planned
from .export import report_written
from .flags import check_out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="vLLM/SGLang config files, or folders holding them")
    parser.add_argument("--out", required=True, help="folder to write the normalized files to (for --baseline-configs)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out_dir(out, flag="--out")
    files, messages = plan_import(args.paths)
    if not files:
        raise UsageError("no vLLM/SGLang config files found in " + " ".join(args.paths))
    report_written(files, write_planned(files, out), messages)
    return 0
