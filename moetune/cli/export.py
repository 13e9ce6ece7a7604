"""`moetune export`: write tables as vLLM or SGLang config files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..export import FORMATS, PlannedFile, plan_export, tables_to_export, write_planned
from .flags import check_out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="which framework's files to write")
    parser.add_argument("--out", required=True, help="folder to write the files to")
    parser.add_argument(
        "--table", nargs="+", action="extend", metavar="PATH",
        help="tables (or folders of tables) to export; default: those the loader uses on this machine",
    )


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out_dir(out, flag="--out")
    tables = tables_to_export(args.table)
    if not tables:
        raise UsageError("no tables found for this device; name them with --table PATH")
    files, messages = plan_export(tables, args.format)
    report_written(files, write_planned(files, out), messages)
    return 0


def report_written(files: list[PlannedFile], written: list[Path], messages: list[str]) -> None:
    """A line per file written, then the notes of planning; `moetune import` reports alike."""
    for file, path in zip(files, written):
        print(f"wrote {path} ({len(file.configs)} batch sizes, from {file.source})")
    for message in messages:
        print(message)
