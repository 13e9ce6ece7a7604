"""Start `moetune` commands as process groups that a test can kill, without paying for the
interpreter start and the torch import (about 3.5 s on 2 cores) each time.

A launcher process imports the command line once (what `python3 -m moetune` imports before
it parses anything), then forks one child per command. Each child leads a process group of
its own, writes its stdout and stderr to two files (error_log names the second) and runs the
command as `python3 -m moetune` does: `moetune.cli.main`, then exit without the
interpreter's teardown.

Run as a module it is the launcher, reading one request a line on stdin and answering one
line on stdout (both JSON):
  {"start": [args...], "log": path, "err": path, "file_size_limit": bytes or null}  ->  {"pid": pid}
  {"wait": pid, "timeout": seconds}  ->  {"code": exit code, or -signal} or {"code": null}
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Launcher:
    """The test's end of the launcher: start, kill and wait for `moetune` commands."""

    def __init__(self) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.faults_support"], cwd=ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.started: set[int] = set()

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the launcher ended with exit code {self.process.wait()}")
        return json.loads(line)

    def start(self, args: list[str], log: Path, file_size_limit: int | None = None) -> int:
        pid = self._ask({"start": [str(a) for a in args], "log": str(log), "err": str(error_log(log)),
                         "file_size_limit": file_size_limit})["pid"]
        self.started.add(pid)
        return pid

    def wait(self, pid: int, timeout: float) -> int | None:
        """The command's exit code (-N: killed by signal N), or None if it still runs after `timeout` s."""
        code = self._ask({"wait": pid, "timeout": timeout})["code"]
        if code is not None:
            self.started.discard(pid)
        return code

    def kill(self, pid: int) -> int:
        """SIGKILL the command's whole process group (it, its compile processes, its workers)."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.wait(pid, timeout=30)
        assert code is not None, f"process {pid} survived SIGKILL"
        return code

    def close(self) -> None:
        for pid in list(self.started):
            self.kill(pid)
        self.process.stdin.close()
        self.process.wait(timeout=30)


def error_log(log: Path) -> Path:
    """Where a command started with `log` writes its stderr."""
    return log.with_suffix(".err")


def _child(args: list[str], log: str, err: str, file_size_limit: int | None) -> None:
    """In the forked child: run the command as `python3 -m moetune` would, then exit."""
    code = 1
    try:
        os.setpgid(0, 0)  # the parent does the same: whichever runs first, kill finds the group
        for path, target in ((log, 1), (err, 2)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, target)
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        if file_size_limit is not None:
            # A full disk, as a write sees it: EFBIG past the limit instead of SIGXFSZ.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        sys.argv = ["moetune", *args]
        from moetune.cli import main

        code = main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - printed as the command would print it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve() -> None:
    import moetune.cli  # noqa: F401 - what the command imports before its first line of work

    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request["start"], request["log"], request["err"], request.get("file_size_limit"))
            try:
                os.setpgid(pid, pid)
            except OSError:  # the child got there first (or already ran its command to the end)
                pass
            answer = {"pid": pid}
        else:
            answer = {"code": _wait(request["wait"], request["timeout"])}
        print(json.dumps(answer), flush=True)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


if __name__ == "__main__":
    _serve()
