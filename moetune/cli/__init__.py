"""Command line: `moetune run | compare | export | import | show | collect`.

One module per command in this package, and `flags` for the flags several commands
share; library modules hold no argparse. Every command module exposes `add_arguments(parser)` and `main(args) -> int`. Bad input is
raised as UsageError (or ValueError/TypeError from validation) and printed as one line on
stderr with exit code 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..device import choose_interpreter_without_gpu
from ..errors import UsageError, environment_errors, one_line

# name -> (module, one-line help)
COMMANDS = {
    "run": ("moetune.cli.run", "tune the MoE kernels for a GPU and write JSON tables"),
    "compare": ("moetune.cli.compare", "time the whole MoE layer: tuned unfused, fused, dispatcher, default and baseline configs"),
    "export": ("moetune.cli.export", "write tables as vLLM or SGLang config files"),
    "import": ("moetune.cli.imports", "read vLLM/SGLang config files into a folder for --baseline-configs"),
    "show": ("moetune.cli.show", "list the tables this machine would use and the configs picked per batch size"),
    "collect": ("moetune.cli.collect", "write the tables from the studies `moetune run --worker` processes filled"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage too: keep it to one line
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moetune", description="Autotune Triton fused-MoE kernels and dispatch the tuned configs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before any command module imports the kernels: without a GPU they run interpreted.
    choose_interpreter_without_gpu()
    try:
        args = build_parser().parse_args(argv)
        return int(args._main(args) or 0)
    except (UsageError, ValueError, TypeError) as error:
        print(f"moetune: error: {error}", file=sys.stderr)
        return 2
    except environment_errors() as error:  # disk full, a storage server gone: a rerun resumes
        print(f"moetune: error: {one_line(error)} (rerun the command to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moetune: interrupted", file=sys.stderr)
        return 130


def run_command() -> None:
    """The `moetune` command: main, then exit without the interpreter's teardown. After a
    tune that teardown (a CUDA context holding every kernel loaded, and the objects of
    torch, Triton and Optuna) took 0.6-1.1 s on an H200 host, with all work done: the
    tables are written and closed, each journal entry synced, the compile processes and
    GPU workers ended. An error that escapes main leaves the usual way, traceback first."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_command()
