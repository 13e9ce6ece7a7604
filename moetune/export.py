"""vLLM and SGLang config files: export tables to them, import them as tuning baselines.

Both frameworks name a file `E={E},N={N},device_name={device key}[,dtype=..][,block_shape=..].json`
and map batch size M (tokens) to one launch config, picking the nearest key at run time.
vLLM runs that one config for both GEMMs. SGLang reads GEMM 2's config from a `..._down.json`
beside it (falling back to GEMM 1's; "USE_TMA": true there runs its sorted-rows TMA path)
and keeps its files in a `triton_X_Y_Z/` folder per Triton version. Neither runs moetune's
other kernel switches: a batch size whose tuned layer has one is exported as the fastest
layer the framework runs that the tune measured (switch_candidates.py), with a note. Neither
selector names bf16 or fp16; float32 MoE looks for `,dtype=float32`, fp8 weights for
`,dtype=fp8_w8a8` and, with scale blocks, `,block_shape=[128,128]` (vLLM) or
`,block_shape=[128, 128]` (SGLang, which prints the list as Python does).

Baselines (--baseline-configs) are a folder of such files, or the name of one packaged with
moetune under `moetune/baselines/`. The commands are in cli/export.py and cli/imports.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import TableError, UsageError
from .loader import nearest_batch_size
from .table_paths import FROM_FAMILY
from .switch_candidates import SGLANG_TMA, LayerCandidate, candidates_of, fastest, sglang_runs, vllm_runs
from .table_listing import find_tables
from .tables import FP8_W8A8, checked_config, read_table, write_atomic
from .types import OFF, Switches

FORMATS = ("vllm", "sglang")
# What Triton launches with when a config leaves these out (some SGLang files do).
TRITON_LAUNCH_DEFAULTS = {"num_warps": 4, "num_stages": 3}
# The file-name dtype selector vLLM and SGLang look for, per moetune dtype.
DTYPE_SELECTORS: dict[str, str | None] = {"bf16": None, "fp16": None, "fp32": "float32", FP8_W8A8: FP8_W8A8}
_BLOCK_SHAPE = re.compile(r"^\[\s*(\d+)\s*,\s*(\d+)\s*\]$")
# vLLM writes this beside the batch sizes and removes it before reading them.
_METADATA_KEYS = ("triton_version",)

_FOREIGN_NAME = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+?)"
    r"(?:,dtype=(?P<dtype>[^,]+?))?"
    r"(?:,block_shape=(?P<block_shape>\[[^\]]*\]))?"
    r"(?:,per_channel_quant=(?P<per_channel_quant>True))?"
    r"(?P<down>_down)?\.json$"
)
_TRITON_FOLDER = re.compile(r"^triton_(\d+)_(\d+)_(\d+)$")


@dataclass(frozen=True)
class ForeignName:
    """The parts of a vLLM/SGLang config file name."""

    E: int
    N: int
    device_key: str
    dtype: str | None = None  # quantization or float32 selector; None for bf16/fp16
    block_shape: str | None = None  # e.g. "[128, 128]"
    per_channel_quant: bool = False
    down: bool = False  # SGLang's GEMM 2 file

    @classmethod
    def parse(cls, name: str) -> ForeignName | None:
        match = _FOREIGN_NAME.match(name)
        if match is None:
            return None
        return cls(
            int(match["E"]), int(match["N"]), match["device"], match["dtype"], match["block_shape"],
            match["per_channel_quant"] is not None, match["down"] is not None,
        )

    @classmethod
    def of_table(cls, shape: Mapping, device_key: str, format: str) -> ForeignName:
        """The name `format`'s fused MoE looks up for a table's shape (its JSON form) on a device."""
        block = shape.get("block_shape")
        spelled = None if block is None else f"[{block[0]},{block[1]}]" if format == "vllm" else \
            f"[{block[0]}, {block[1]}]"
        return cls(shape["E"], shape["N"], device_key, DTYPE_SELECTORS[shape["dtype"]], spelled)

    @property
    def block(self) -> tuple[int, int] | None:
        """The block shape as numbers, however the name spells it (None: none, or unreadable)."""
        match = _BLOCK_SHAPE.match(self.block_shape or "")
        return (int(match[1]), int(match[2])) if match else None

    @property
    def file_name(self) -> str:
        return (
            f"E={self.E},N={self.N},device_name={self.device_key}"
            + (f",dtype={self.dtype}" if self.dtype else "")
            + (f",block_shape={self.block_shape}" if self.block_shape else "")
            + (",per_channel_quant=True" if self.per_channel_quant else "")
            + ("_down" if self.down else "")
            + ".json"
        )


@dataclass
class ForeignConfigs:
    configs: dict[int, dict[str, int]]  # batch size -> the six keys
    filled: list[int] = field(default_factory=list)  # batch sizes given Triton's launch defaults


def read_foreign_configs(path: str | os.PathLike) -> ForeignConfigs:
    """Read a vLLM/SGLang file as {M: config}; problems are TableErrors naming file and key.

    Keys the kernels here do not use (USE_TMA) are dropped; a missing num_warps/num_stages
    gets Triton's launch default, which is what SGLang runs such an entry with.
    """
    path = Path(path)
    source = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise TableError(f"cannot read config file {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise TableError(f"bad config file {path}: not valid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(data, dict):
        raise TableError(f"bad config file {path}: must be a JSON object of batch sizes")
    result = ForeignConfigs({})
    for key, value in data.items():
        if key in _METADATA_KEYS:
            continue
        try:
            M = int(key)
        except ValueError:
            raise TableError(f"bad config file {path}: [{key!r}]: not a batch size") from None
        if M <= 0 or M in result.configs:
            raise TableError(f"bad config file {path}: [{key!r}]: batch size must be positive and given once")
        if isinstance(value, Mapping) and any(launch not in value for launch in TRITON_LAUNCH_DEFAULTS):
            value = {**TRITON_LAUNCH_DEFAULTS, **value}
            result.filled.append(M)
        result.configs[M] = checked_config(value, source, f'["{key}"]', kind="config file")
    if not result.configs:
        raise TableError(f"bad config file {path}: holds no batch size")
    result.configs = dict(sorted(result.configs.items()))
    return result


def foreign_json(configs: Mapping[int, Mapping[str, int]]) -> str:
    """A file vLLM and SGLang read with `{int(k): v for k, v in json.load(f).items()}`."""
    return json.dumps({str(M): dict(configs[M]) for M in sorted(configs)}, indent=4) + "\n"


def nearest(configs: Mapping[int, dict], M: int) -> dict:
    """The config of the batch size nearest M (ties to the smaller), as vLLM and SGLang pick it."""
    return configs[nearest_batch_size(configs, M)]


# ---------------------------------------------------------------------------------------
# Export


def vllm_configs(table: Mapping) -> tuple[dict[int, dict], list[str]]:
    """One config per batch size: GEMM 1's, of the unfused variant; and a note per batch
    size whose layer vLLM cannot run as tuned.

    vLLM runs a single config for both GEMMs and stores GEMM 2's output before a separate
    reduce, as the unfused variant does. GEMM 1 carries twice GEMM 2's work (2N outputs),
    so its config is the one to keep. GEMM 1 is the same kernel in both variants, so a
    batch size tuned only fused still gives its GEMM 1 config. vLLM runs no kernel switch:
    where the variant's layer has one, the fastest all-off layer of that variant the tune
    measured (its switch candidates) gives the config, else the variant's own GEMM 1 config.
    """
    configs, notes = {}, []
    for M, entry in table["batch_sizes"].items():
        name = "unfused" if "unfused" in entry else "fused"
        variant = entry[name]
        configs[M] = dict(variant["gemm1"])
        switches = Switches.from_json(variant.get("switches", {}))
        if not vllm_runs(switches):
            plain = fastest(c for c in candidates_of(entry, f"batch_sizes[{M}]")
                            if c.variant.value == name and vllm_runs(c.switches))
            if plain is not None:
                configs[M] = plain.gemm1.to_json()
            notes.append(_fallback_note(M, switches, "vLLM", plain, variant["layer_us"]))
    return configs, notes


def sglang_configs(table: Mapping) -> tuple[dict[int, dict], dict[int, dict], list[str]]:
    """GEMM 1 and GEMM 2 ("_down") configs of each batch size's winning layer, and a note per
    batch size written otherwise.

    Where the winner runs SGLang's TMA path (sorted rows, both GEMM 2 operands through TMA),
    the `_down` config carries "USE_TMA": true. Where it runs a switch SGLang cannot (fused
    SiLU, persistent, split-K, a part of the TMA path), the fastest layer SGLang runs that the
    tune measured for that batch size (its switch candidates, either variant) is written
    instead, else the winner's configs without their switches. SGLang sorts tokens once, by
    GEMM 1's BLOCK_SIZE_M, for both GEMMs: where GEMM 2's config has another BLOCK_SIZE_M,
    GEMM 1's config is written for GEMM 2 too (what SGLang does with no _down file) rather
    than an altered, never-timed config.
    """
    up, down, notes, replaced = {}, {}, [], []
    for M, entry in table["batch_sizes"].items():
        winner = entry[entry["winner"]]
        gemm1, gemm2 = winner["gemm1"], winner["gemm2"]
        switches = Switches.from_json(winner.get("switches", {}))
        if not sglang_runs(switches):
            runnable = fastest(c for c in candidates_of(entry, f"batch_sizes[{M}]") if sglang_runs(c.switches))
            notes.append(_fallback_note(M, switches, "SGLang", runnable, winner["layer_us"]))
            switches = OFF
            if runnable is not None:
                gemm1, gemm2, switches = runnable.gemm1.to_json(), runnable.gemm2.to_json(), runnable.switches
        up[M] = dict(gemm1)
        if gemm2["BLOCK_SIZE_M"] == gemm1["BLOCK_SIZE_M"]:
            down[M] = {**gemm2, "USE_TMA": True} if switches == SGLANG_TMA else dict(gemm2)
        else:
            down[M] = dict(gemm1)
            replaced.append(M)
    if replaced:
        notes.append(f"GEMM 2 gets GEMM 1's config at M={', '.join(map(str, replaced))} "
                     f"(SGLang needs the same BLOCK_SIZE_M for both GEMMs)")
    return up, down, notes


def _fallback_note(M: int, switches: Switches, framework: str, written: LayerCandidate | None,
                   tuned_us: float) -> str:
    runs = ", ".join(f"{name}={value}" if name == "split_k" else name for name, value in switches.to_json().items())
    if written is None:
        return (f"M={M}: the tuned layer runs {runs}, which {framework} cannot, and no layer {framework} runs "
                f"was measured: wrote its configs without the switches (never timed so)")
    how = ", ".join(written.switches.to_json()) or "all switches off"
    return (f"M={M}: the tuned layer runs {runs}, which {framework} cannot: wrote the fastest layer {framework} "
            f"runs that the tune measured ({written.variant.value}, {how}: {written.layer_us:.1f} us against "
            f"{tuned_us:.1f} us)")


def sglang_version_folder(triton_version: str) -> str:
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", triton_version)
    if match is None:
        raise ValueError(f"cannot name an SGLang folder after Triton version {triton_version!r}")
    return f"triton_{match[1]}_{match[2]}_{match[3] or 0}"


@dataclass
class PlannedFile:
    relative: Path
    configs: dict[int, dict]
    source: str


def plan_export(tables: list[tuple[str, dict]], format: str) -> tuple[list[PlannedFile], list[str]]:
    """The files to write for (path, table) pairs, and a line per table skipped or adjusted.

    bf16 and fp16 tables of one (E, N, device) share one file name; bf16 goes first and the
    other is skipped. So is a second table of the same E and N with another K or top-k:
    these formats have no place for them.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    dtype_rank = {"bf16": 0, "fp16": 1, "fp32": 2, FP8_W8A8: 3}
    ordered = sorted(tables, key=lambda item: dtype_rank[item[1]["shape"]["dtype"]])
    planned: dict[Path, PlannedFile] = {}
    messages: list[str] = []
    for source, table in ordered:
        shape = table["shape"]
        name = ForeignName.of_table(shape, table["device"]["key"], format)
        try:
            if format == "vllm":
                configs, notes = vllm_configs(table)
                files = [PlannedFile(Path(name.file_name), configs, source)]
            else:
                folder = Path(sglang_version_folder(table["versions"]["triton"]))
                up, down, notes = sglang_configs(table)
                down_name = dataclasses.replace(name, down=True)
                files = [PlannedFile(folder / name.file_name, up, source),
                         PlannedFile(folder / down_name.file_name, down, source)]
        except ValueError as error:  # a bad switch candidate (the table checks leave that key to its writers)
            raise TableError(f"bad table {source}: {error}") from None
        messages += [f"note: {source}: {note}" for note in notes]
        clash = next((planned[file.relative] for file in files if file.relative in planned), None)
        if clash is not None:
            messages.append(f"skipped {source}: its {format} file {clash.relative} is written from {clash.source}")
            continue
        planned.update((file.relative, file) for file in files)
    return list(planned.values()), messages


def tables_to_export(paths: list[str] | None) -> list[tuple[str, dict]]:
    """(path, table) of the named tables and of every table under the named folders; with
    no paths, the tables the loader uses on this machine (not those of another device of its
    family). A missing path or a bad table raises before anything is written."""
    if paths:
        files: list[Path] = []
        for name in paths:
            path = Path(name)
            if path.is_dir():
                files += sorted(path.rglob("*.json"))
            elif path.is_file():
                files.append(path)
            else:
                raise UsageError(f"no such table: {path}")
        return [(str(path), read_table(path)) for path in files]
    found = [entry for entry in find_tables() if entry.used and entry.file.origin != FROM_FAMILY]
    return [(str(entry.file.path), entry.table) for entry in found]


def write_planned(files: list[PlannedFile], out: str | os.PathLike) -> list[Path]:
    """Write planned vLLM/SGLang files under `out`, each atomically; returns their paths."""
    written = []
    for file in files:
        path = Path(out) / file.relative
        write_atomic(path, foreign_json(file.configs))
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------
# Import


def triton_folder_version(name: str) -> tuple[int, int, int] | None:
    match = _TRITON_FOLDER.match(name)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def plan_import(paths: list[str]) -> tuple[list[PlannedFile], list[str]]:
    """Normalized copies of vLLM/SGLang files (or of every such file under a folder).

    A file inside a `triton_X_Y_Z/` folder keeps that folder, so find_baseline can still
    prefer the running Triton's configs.
    """
    sources: list[Path] = []
    messages: list[str] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for found in sorted(path.rglob("*.json")):
                if ForeignName.parse(found.name):
                    sources.append(found)
                else:
                    messages.append(f"skipped {found}: not a vLLM/SGLang config file name")
        elif path.is_file():
            if not ForeignName.parse(path.name):
                raise UsageError(f"{path}: not a vLLM/SGLang config file name (E=..,N=..,device_name=...json)")
            sources.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    planned: dict[Path, PlannedFile] = {}
    for path in sources:
        read = read_foreign_configs(path)
        folder = path.parent.name if triton_folder_version(path.parent.name) else ""
        relative = Path(folder) / ForeignName.parse(path.name).file_name
        earlier = planned.get(relative)
        if earlier is not None:
            if earlier.configs != read.configs:
                raise UsageError(f"{path} and {earlier.source} would both become {relative} but differ")
            continue
        planned[relative] = PlannedFile(relative, read.configs, str(path))
        if read.filled:
            messages.append(
                f"note: {path}: num_warps/num_stages missing at M={', '.join(map(str, read.filled))}; "
                f"set to Triton's launch defaults (4, 3)"
            )
    return list(planned.values()), messages
