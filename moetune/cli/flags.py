"""Flags several commands share: the shape, GPU, dtype and batch sizes of a workload, what
names a tuning run, and the checks of output folders and storages that run before any work."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..device import DeviceInfo
from ..errors import UsageError
from ..quant import check_block_shape
from ..shapes import DEFAULT_BATCH_SIZES, MoEShape, parse_batch_sizes, resolve_shapes
from ..tables import FP8_W8A8, TORCH_DTYPES, TableDtype
from ..tune.storage import DEFAULT_HEARTBEAT_S, GRACE_BEATS, database_url, is_database_url
from ..types import Variant


def add_shape_arguments(parser) -> None:
    """The flags that name a shape, shared by the commands that take one."""
    shape = parser.add_argument_group("shape (a preset, a Hugging Face config.json, or the sizes)")
    shape.add_argument("--model", help="built-in preset, e.g. Qwen3-30B-A3B")
    shape.add_argument("--model-config", help="path of a local Hugging Face config.json")
    shape.add_argument("--E", type=int, help="number of experts")
    shape.add_argument("--topk", type=int, help="experts per token")
    shape.add_argument("--hidden", type=int, help="hidden size K")
    shape.add_argument("--intermediate", type=int, help="intermediate size N per rank (before --tp-size)")
    shape.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size: divides the intermediate size")


def add_workload_arguments(parser: argparse.ArgumentParser, gpu_help: str, dtypes=("bf16", "fp16")) -> None:
    """Shape, GPU, dtype and batch sizes: what `run`, `collect` and `compare` all take."""
    add_shape_arguments(parser)
    parser.add_argument("--gpu", default="auto", help=gpu_help)
    fp8 = f"; {FP8_W8A8}: fp8 e4m3 weights and activations (see --block-shape)" if FP8_W8A8 in dtypes else ""
    parser.add_argument("--dtype", default=None, choices=dtypes,
                        help=f"default bf16 (or a preset's published quantization); fp16 without a GPU (the "
                             f"interpreter has no bf16 atomic add){fp8}")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated token counts M (default: " + ",".join(map(str, DEFAULT_BATCH_SIZES)) + ")")


def shapes_and_batch_sizes(args: argparse.Namespace) -> tuple[list, list[int]]:
    """The shapes and batch sizes the flags of add_workload_arguments name."""
    shapes = resolve_shapes(E=args.E, topk=args.topk, hidden=args.hidden, intermediate=args.intermediate,
                            model=args.model, model_config=args.model_config, tp_size=args.tp_size)
    batch_sizes = parse_batch_sizes(args.batch_sizes) if args.batch_sizes is not None else list(DEFAULT_BATCH_SIZES)
    return shapes, batch_sizes


def baseline_folder(text: str | None) -> Path | None:
    """--baseline-configs: a folder of vLLM/SGLang files or a packaged baseline's name, or None."""
    if not text:
        return None
    from ..baseline_configs import baseline_folder_for

    return baseline_folder_for(text)


def add_block_shape_argument(parser: argparse.ArgumentParser) -> None:
    """--block-shape, which goes with --dtype fp8_w8a8 (resolve_table_dtype reads both)."""
    parser.add_argument("--block-shape", default=None, metavar="BN,BK",
                        help=f"with --dtype {FP8_W8A8}: the weights' scale blocks, e.g. 128,128 as DeepSeek-V3 "
                             f"and the Qwen3 FP8 releases publish them (default: one scale per expert, or a "
                             f"preset's)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What names a tuning run: `run` and `collect` take these alike."""
    add_workload_arguments(parser, "GPU the table is for; must match the local one (default: auto)",
                           dtypes=("bf16", "fp16", FP8_W8A8))
    add_block_shape_argument(parser)
    parser.add_argument("--ep-size", type=int, default=1, metavar="R",
                        help="expert-parallel size: tune one rank's local shape, E/R experts, with the routing "
                             "over all E (the table is named by E/R, as vLLM names it; default 1)")
    parser.add_argument("--variants", default="unfused,fused", help="unfused, fused or both (default)")
    parser.add_argument("--trials", type=int, default=24, help="trials per GEMM role and batch size (default 24)")
    parser.add_argument("--out-dir", default="tuned_configs", help="where tables go (default ./tuned_configs)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (e.g. sqlite:///s.db, postgresql://...) or a journal file path; "
                             "default: a journal file beside the tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", default=None, metavar="YAML", help="search space overriding the default")
    parser.add_argument("--switches", choices=("search", "off"), default=None,
                        help="kernel switches the layer choice tries: those of the space (default on a GPU), or "
                             "none; without a GPU the default tries only those a --space file lists")
    parser.add_argument("--heartbeat", type=int, default=DEFAULT_HEARTBEAT_S, metavar="SECONDS",
                        help=f"how often a process records that its trials are alive; a trial silent for "
                             f"{GRACE_BEATS} intervals is failed and retried (default {DEFAULT_HEARTBEAT_S}; "
                             f"the same on every host)")
    parser.add_argument("--retime", action="store_true",
                        help="choose the layer pairs again of batch sizes already written (by default a batch "
                             "size whose studies are complete and whose table entry is written is left as it is)")


def resolve_gpu(requested: str, local: DeviceInfo) -> DeviceInfo:
    """--gpu must name the local device: 'auto', or a case-insensitive part of its name."""
    if requested.strip().lower() in ("auto", local.name.lower(), local.key.lower()):
        return local
    if local.is_gpu and requested.strip().lower() in local.name.lower():
        return local
    where = f"the local GPU is {local.name!r}" if local.is_gpu else "this machine has no GPU (use --gpu auto or cpu)"
    raise UsageError(f"--gpu {requested!r} does not match: {where}")


def resolve_table_dtype(requested: str | None, block_text: str | None, shapes: list[MoEShape], device: DeviceInfo,
                        atomics: bool) -> tuple[TableDtype, str]:
    """(what the tables are keyed by, the activations' dtype) from --dtype and --block-shape;
    without --dtype, the published quantization the shapes' preset carries, if any. An fp8
    tune's activations are bf16 on a GPU, fp16 in the interpreter."""
    block = parse_block_shape(block_text) if block_text is not None else None
    published = {(shape.dtype, shape.block_shape) for shape in shapes}
    if requested is None and len(published) == 1 and next(iter(published))[0] is not None:
        requested, preset_block = next(iter(published))
        block = block or preset_block
    if requested != FP8_W8A8:
        if block is not None:
            raise UsageError(f"--block-shape {block_text} needs --dtype {FP8_W8A8}")
        dtype = resolve_dtype(requested, device, atomics)
        return TableDtype.of(dtype), dtype
    return TableDtype(FP8_W8A8, block), "bf16" if device.is_gpu else "fp16"


def parse_block_shape(text: str) -> tuple[int, int]:
    """--block-shape "128,128": block_n and block_k, powers of two >= 16 as the fp8 kernels take
    them (a dimension the block does not divide ends in a partial block, as in the checkpoints)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2 or not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"--block-shape {text!r}: expected two positive integers BN,BK, e.g. 128,128")
    try:
        return check_block_shape((int(parts[0]), int(parts[1])), f"--block-shape {text!r}")
    except ValueError as error:
        raise UsageError(str(error)) from None


def resolve_dtype(requested: str | None, device: DeviceInfo, atomics: bool) -> str:
    """--dtype, defaulting to bf16 on a GPU and fp16 without one: Triton's interpreter has no
    bf16 atomic add, so the fused variant cannot run bf16 there."""
    dtype = requested or ("bf16" if device.is_gpu else "fp16")
    if dtype == "bf16" and atomics and not device.is_gpu:
        raise UsageError("--dtype bf16 with the fused variant needs a GPU: Triton's interpreter has no "
                         "bf16 atomic add (use --dtype fp16)")
    return dtype


def check_out_dir(path: Path, flag: str = "--out-dir") -> None:
    """Refuse an output folder that cannot be written, before anything is written: create
    and remove a file there (or, where the folder does not exist yet, a folder in its nearest
    existing parent), since os.access says yes to root where the file system says no
    (/proc). The error names the command's `flag`."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(probe)!r} is not a folder")
    problem = _cannot_create_in(probe, make_folder=probe != path)
    if problem is not None:
        raise UsageError(f"{flag} {str(path)!r} is not writable: {problem}")


def _cannot_create_in(parent: Path, make_folder: bool = False) -> str | None:
    """Why a file (or with `make_folder`, a folder) cannot be created in `parent`, found by
    creating and removing one; None when it can."""
    try:
        if make_folder:
            os.rmdir(tempfile.mkdtemp(prefix=".moetune-probe-", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=".moetune-probe-", dir=parent)
            os.close(fd)
            os.unlink(name)
    except OSError as error:
        return error.strerror or str(error)
    return None


def check_memory(shapes: list[MoEShape], batch_sizes: list[int], dtype: str, device: DeviceInfo,
                 processes: int = 1) -> None:
    """Refuse sizes whose weights and buffers cannot fit the memory the kernels run in: the
    GPU's, or in Triton's interpreter the host's, which its `processes` share. Asks CUDA for
    the GPU's memory: call it after any process is forked."""
    from ..tune.inputs import memory_needed

    if device.is_gpu:
        import torch

        available = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where, each = f"the {device.name} has {_gib(available)}", 1
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where, each = f"this machine has {_gib(available)} (the interpreter runs on the CPU)", processes
    for shape in shapes:
        weights, inputs = memory_needed(shape, batch_sizes, TORCH_DTYPES[dtype].itemsize)
        if (weights + inputs) * each > available:
            per_process = f" in each of {each} processes" if each > 1 else ""
            raise UsageError(f"{shape.describe()} with batch sizes up to {max(batch_sizes)}: the tune needs at least "
                             f"{_gib(weights + inputs)} (weights {_gib(weights)} + inputs and buffers {_gib(inputs)})"
                             f"{per_process} but {where}")


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


def check_storage(url: str) -> None:
    """Reach the storage now, so a typo fails in one line instead of after compiling."""
    if not is_database_url(url):
        _check_storage_folder(url, Path(url).resolve().parent)
        return
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(database_url(url))
        if engine.dialect.name == "sqlite":
            database = engine.url.database
            if database and database != ":memory:":
                _check_storage_folder(url, Path(database).resolve().parent)
            return
        with engine.connect():
            pass
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - any driver error means the storage is unusable
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--storage {url!r} is unreachable: {first}") from None


def _check_storage_folder(url: str, folder: Path) -> None:
    """The folder of a journal or SQLite file: it must exist, and take a new file."""
    if not folder.is_dir():
        raise UsageError(f"--storage {url!r}: folder {str(folder)!r} does not exist")
    problem = _cannot_create_in(folder)
    if problem is not None:
        raise UsageError(f"--storage {url!r}: cannot write in folder {str(folder)!r}: {problem}")


def parse_variants(text: str) -> list[Variant]:
    variants = [item.strip() for item in text.split(",") if item.strip()]
    names = [variant.value for variant in Variant]
    if not variants or any(v not in names for v in variants):
        raise UsageError(f"--variants {text!r}: use unfused, fused or unfused,fused")
    return [variant for variant in Variant if variant.value in variants]
