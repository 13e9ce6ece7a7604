"""Files moetune reads and writes: JSON read within limits, atomic writes, a folder lock.

Tables, vLLM/SGLang config files and comparison results all go through here, so each
is written atomically with the mode the umask gives, and no file can make the reader
run out of memory or recursion.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import TableError

# A table holds a few hundred batch sizes at most (about 600 bytes each) and nests 6 levels.
MAX_JSON_BYTES = 16 << 20
MAX_JSON_NESTING = 32

_NESTING_TOKENS = re.compile(r'"(?:[^"\\]+|\\.)*"|[\[\]{}]')


def nesting_depth(text: str, limit: int = MAX_JSON_NESTING) -> int:
    """How deep a JSON text nests objects and arrays, counting no further than limit + 1."""
    depth = deepest = 0
    for match in _NESTING_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif token in "]}":
            depth -= 1
    return deepest


def read_json(path: str | os.PathLike, kind: str = "table") -> Any:
    """Parse a JSON file of at most MAX_JSON_BYTES nested at most MAX_JSON_NESTING deep.

    Any problem (a folder or other non-file at the path, unreadable, too large, too deep,
    not JSON) is a TableError naming the `kind` of file and its path. Python's parser
    recurses once per level, so the depth is checked before it runs.
    """
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise TableError(f"bad {kind} {path}: a folder stands where a {kind} file should be")
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader forever
            raise TableError(f"bad {kind} {path}: not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise TableError(f"bad {kind} {path}: {info.st_size} bytes, more than the {MAX_JSON_BYTES} a {kind} may hold")
        with open(path, "rb") as file:
            raw = file.read(MAX_JSON_BYTES + 1)
    except OSError as error:
        raise TableError(f"cannot read {kind} {path}: {error.strerror or error}") from None
    if len(raw) > MAX_JSON_BYTES:  # grew since stat
        raise TableError(f"bad {kind} {path}: more than the {MAX_JSON_BYTES} bytes a {kind} may hold")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TableError(f"cannot read {kind} {path}: not UTF-8 text (byte {error.start})") from None
    if nesting_depth(text) > MAX_JSON_NESTING:
        raise TableError(f"bad {kind} {path}: nested deeper than {MAX_JSON_NESTING} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (empty file)" if not text.strip() else " (truncated or corrupt file?)"
        raise TableError(f"bad {kind} {path}: not valid JSON at line {error.lineno} column {error.colno}: "
                         f"{error.msg}{hint}") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise TableError(f"bad {kind} {path}: not valid JSON: {error}") from None


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) so that readers see the old file
    or the new one, never a part; a failed write leaves the old file and no temporary one.

    The temporary file lives in the target's folder because os.replace is atomic only
    within one file system. It is created with mode 0666 for the kernel to apply the umask
    (and any default ACL) to, as it does for every new file: 0644 under umask 022. fsync
    before the rename so that a crash cannot leave an empty file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temp_name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data.encode("utf-8") if isinstance(data, str) else data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a folder (created if absent) while the block runs:
    processes that read, change and write a file in it take turns. The lock is on the
    folder itself, so it leaves no lock file behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
