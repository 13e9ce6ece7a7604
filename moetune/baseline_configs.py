"""Baselines: the configs vLLM and SGLang ship, found per shape as the tuner's warm start and
`moetune compare`'s `base`, and the anchor figures (another framework's measured layer times)
that `moetune compare` and scripts/check_gpu.py report against. Packaged ones live in
`moetune/baselines/<name>/`."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .device import device_key as to_device_key
from .errors import UsageError
from .export import DTYPE_SELECTORS, ForeignName, read_foreign_configs, triton_folder_version
from .files import read_json
from .tables import TableDtype

# Baselines packaged with moetune, one folder each: --baseline-configs takes a folder's name.
BASELINES_DIR = Path(__file__).resolve().parent / "baselines"
# A baseline folder's anchor figures, beside its config files.
ANCHORS_FILE = "anchors.json"


def packaged_baselines() -> dict[str, Path]:
    """Name -> folder of each baseline packaged with moetune."""
    if not BASELINES_DIR.is_dir():
        return {}
    return {folder.name: folder for folder in sorted(BASELINES_DIR.iterdir()) if folder.is_dir()}


def baseline_folder_for(text: str) -> Path:
    """What --baseline-configs names: a folder of vLLM/SGLang files, else the name of a baseline
    packaged with moetune (so a command runs the same from any directory)."""
    if Path(text).is_dir():
        return Path(text)
    packaged = packaged_baselines()
    if text in packaged:
        return packaged[text]
    names = ", ".join(packaged) or "none"
    raise UsageError(f"--baseline-configs {text!r} is neither a folder nor a packaged baseline ({names})")


@dataclass
class Baseline:
    """Another framework's configs for one shape, as a starting point for tuning."""

    gemm1: dict[int, dict]
    gemm2: dict[int, dict]
    sources: list[str]


def find_baseline(
    folder: str | os.PathLike, E: int, N: int, device_key: str, dtype: str | TableDtype = "bf16",
    block_shape=None,
) -> Baseline | None:
    """vLLM/SGLang configs for (E, N, device) under `folder`, searched recursively.

    Only files of the dtype's selector count: none for bf16/fp16, `,dtype=float32` for fp32,
    `,dtype=fp8_w8a8` with the same block shape (spelled either way) for fp8. Among
    `triton_X_Y_Z/` folders the running Triton's wins, else the newest; files outside such
    folders (vLLM's) come last. GEMM 2 takes the `_down` file beside GEMM 1's if there is one,
    else GEMM 1's configs, as both frameworks do.
    """
    wanted = TableDtype.of(dtype, block_shape)
    selector = DTYPE_SELECTORS[wanted.name]
    key = to_device_key(device_key)
    groups: dict[tuple[int, int, int] | None, dict[bool, list[Path]]] = {}
    for path in sorted(Path(folder).rglob("*.json")):
        name = ForeignName.parse(path.name)
        if (
            name is None
            or (name.E, name.N, name.device_key, name.dtype) != (E, N, key, selector)
            or (name.block_shape is not None and name.block is None)
            or name.block != wanted.block_shape
            or name.per_channel_quant
        ):
            continue
        version = triton_folder_version(path.parent.name)
        groups.setdefault(version, {}).setdefault(name.down, []).append(path)
    usable = {version: files for version, files in groups.items() if files.get(False)}
    if not usable:
        return None
    version = _preferred_version(list(usable))
    up_path = min(usable[version][False], key=lambda path: (len(path.parts), str(path)))
    down_path = next((path for path in usable[version].get(True, []) if path.parent == up_path.parent), None)
    gemm1 = read_foreign_configs(up_path).configs
    if down_path is None:
        return Baseline(gemm1, {M: dict(config) for M, config in gemm1.items()}, [str(up_path)])
    return Baseline(gemm1, read_foreign_configs(down_path).configs, [str(up_path), str(down_path)])


def _preferred_version(versions: list[tuple[int, int, int] | None]) -> tuple[int, int, int] | None:
    import triton

    match = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", triton.__version__)
    running = tuple(int(part) for part in match.groups()) if match else None
    if running in versions:
        return running
    versioned = [version for version in versions if version is not None]
    return max(versioned) if versioned else None


@dataclass(frozen=True)
class Anchor:
    """Another framework's measured layer times for one shape, dtype and device."""

    times_us: dict[int, float]  # batch size M -> µs per layer call
    source: str  # the file's provenance line
    path: Path


def find_anchor(
    E: int, N: int, K: int, topk: int, dtype: str | TableDtype, device_key: str,
    folder: str | os.PathLike | None = None,
) -> Anchor | None:
    """The anchor figures of one shape, dtype and device: from `folder`'s anchors.json when it
    has one, else from those packaged with moetune; None where none lists them. A malformed
    file raises ValueError naming it, the key and the value."""
    own = Path(folder) / ANCHORS_FILE if folder is not None else None
    if own is not None and own.is_file():
        files = [own]
    else:
        files = [path for path in (baseline / ANCHORS_FILE for baseline in packaged_baselines().values())
                 if path.is_file()]
    wanted = (E, N, K, topk, str(TableDtype.of(dtype)), to_device_key(device_key))
    for path in files:
        anchor = read_anchors(path).get(wanted)
        if anchor is not None:
            return anchor
    return None


def read_anchors(path: str | os.PathLike) -> dict[tuple[int, int, int, int, str, str], Anchor]:
    """(E, N, K, topk, dtype, device key) -> Anchor, for every shape an anchors file lists:
    {"device": name, "source": line, "shapes": [{"E", "N", "K", "topk", "dtype", "us": {M: µs}}]}."""
    path = Path(path)
    document = read_json(path, kind="anchor file")  # size and nesting limits, one-line TableError

    def checked(value, where: str, valid, wanted: str):
        if not valid(value):
            raise ValueError(f"{path}: {where} must be {wanted}, got {value!r}")
        return value

    def text(value) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def positive(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0

    def count(value) -> bool:
        return positive(value) and isinstance(value, int)

    checked(document, "the file", lambda value: isinstance(value, dict), "a JSON object")
    device = to_device_key(checked(document.get("device"), "'device'", text, "a device name"))
    source = checked(document.get("source"), "'source'", text, "a line saying what was measured")
    anchors = {}
    for index, entry in enumerate(checked(document.get("shapes"), "'shapes'", lambda value: isinstance(value, list),
                                          "a list")):
        where = f"shapes[{index}]"
        checked(entry, where, lambda value: isinstance(value, dict), "an object")
        E, N, K, topk = (checked(entry.get(key), f"{where}.{key}", count, "a positive integer")
                         for key in ("E", "N", "K", "topk"))
        try:
            dtype = str(TableDtype.of(entry.get("dtype")))
        except ValueError as error:
            raise ValueError(f"{path}: {where}.dtype: {error}") from None
        times = checked(entry.get("us"), f"{where}.us", lambda value: isinstance(value, dict) and value,
                        "an object of batch size -> µs")
        times_us = {}
        for M, us in times.items():
            checked(M, f"{where}.us key", lambda value: value.isascii() and value.isdigit() and int(value) > 0,
                    "a batch size")
            times_us[int(M)] = float(checked(us, f"{where}.us[{M!r}]", positive, "a positive number of µs"))
        anchors[(E, N, K, topk, dtype, device)] = Anchor(dict(sorted(times_us.items())), source, path)
    return anchors
