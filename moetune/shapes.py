"""MoE layer shapes: built-in presets, Hugging Face configs and the `moetune run` shape flags.

E is the number of experts, K the hidden size, N the intermediate size of one expert on one
tensor-parallel rank (w1 is [E, 2N, K], w2 is [E, K, N]) and topk the experts per token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UsageError

PRESETS_PATH = Path(__file__).with_name("presets.yaml")

DEFAULT_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384]
# The largest batch size (tokens M) a tune or a comparison takes.
MAX_BATCH_SIZE = 65536

# Hugging Face field names, in order of preference, per quantity.
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
TOPK_FIELDS = ("num_experts_per_tok",)
HIDDEN_FIELDS = ("hidden_size",)
INTERMEDIATE_FIELDS = ("moe_intermediate_size", "intermediate_size")  # Qwen/DeepSeek also list a dense size

PRESET_KEYS = ("experts", "topk", "hidden", "intermediate", "renormalize", "num_layers")
FP8_W8A8 = "fp8_w8a8"  # tables.FP8_W8A8; shapes.py imports no torch


@dataclass(frozen=True)
class MoEShape:
    E: int
    N: int
    K: int
    topk: int
    name: str | None = None  # preset name if any
    renormalize: bool = True  # norm_topk_prob of the model
    num_layers: int | None = None  # MoE layers in the model (for prefill benchmarks)
    # The published weights' quantization: "fp8_w8a8" with its scale blocks (None: one
    # scale per expert); dtype None for bf16 weights. `moetune run` tunes it by default.
    dtype: str | None = None
    block_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for field in ("E", "N", "K", "topk"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"MoEShape.{field} must be a positive int, got {value!r}")
        if self.topk > self.E:
            raise ValueError(f"MoEShape.topk ({self.topk}) cannot exceed E ({self.E})")

    def table_name(self, dtype: str) -> str:
        from .tables import table_file_name  # the one place table files are named

        return table_file_name(self.E, self.N, self.K, self.topk, dtype)

    def describe(self) -> str:
        sizes = f"E={self.E}, top-k={self.topk}, hidden={self.K}, intermediate={self.N}"
        return f"{self.name or 'custom'} ({sizes})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def split_for_tp(shape: MoEShape, tp_size: int) -> MoEShape:
    """The shape one rank sees: tensor parallelism splits every expert's intermediate size."""
    if not _is_int(tp_size) or tp_size < 1:
        raise UsageError(f"tensor-parallel size must be a positive integer, got {tp_size!r}")
    if shape.N % tp_size:
        raise UsageError(f"intermediate size {shape.N} is not divisible by tensor-parallel size {tp_size}")
    return dataclasses.replace(shape, N=shape.N // tp_size)


# ---------------------------------------------------------------- presets


@functools.lru_cache(maxsize=1)
def _presets_from_file() -> tuple[MoEShape, ...]:
    entries = yaml.safe_load(PRESETS_PATH.read_text(encoding="utf-8"))
    shapes = []
    for name, entry in entries.items():
        missing = [key for key in PRESET_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{PRESETS_PATH}: preset {name!r} is missing {', '.join(missing)}")
        dtype, block = entry.get("dtype"), entry.get("block_shape")
        if dtype not in (None, FP8_W8A8) or (block is not None and (dtype is None or not isinstance(block, list)
                                                                     or len(block) != 2)):
            raise ValueError(f"{PRESETS_PATH}: preset {name!r}: dtype must be {FP8_W8A8} (block_shape [BN, BK]) "
                             f"or absent, got {dtype!r} {block!r}")
        shapes.append(
            MoEShape(
                E=entry["experts"],
                N=entry["intermediate"],
                K=entry["hidden"],
                topk=entry["topk"],
                name=str(name),
                renormalize=bool(entry["renormalize"]),
                num_layers=entry["num_layers"],
                dtype=dtype,
                block_shape=tuple(block) if block is not None else None,
            )
        )
    return tuple(shapes)


def load_presets() -> dict[str, MoEShape]:
    """Every built-in shape by its model name, unsplit (tensor-parallel size 1)."""
    return {shape.name: shape for shape in _presets_from_file()}  # type: ignore[misc]


def get_preset(name: str, tp_size: int = 1) -> MoEShape:
    presets = load_presets()
    by_lower_name = {key.lower(): shape for key, shape in presets.items()}
    shape = by_lower_name.get(name.strip().lower())
    if shape is None:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(presets)}")
    return split_for_tp(shape, tp_size)


def presets_matching(E: int, topk: int) -> list[MoEShape]:
    """Presets with this expert count and top-k, sorted by name; a shape that two presets
    share (a model and its FP8 release) once, under the first name."""
    matches = [shape for shape in load_presets().values() if shape.E == E and shape.topk == topk]
    unique: dict[tuple[int, int, int, int], MoEShape] = {}
    for shape in sorted(matches, key=lambda shape: (shape.name or "").lower()):
        unique.setdefault((shape.E, shape.N, shape.K, shape.topk), shape)
    return list(unique.values())


# ---------------------------------------------------------------- Hugging Face configs


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise UsageError(f"cannot read model config {path}: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"model config {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"model config {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _field(config: Mapping[str, Any], fields: tuple[str, ...], path: Path, what: str) -> int:
    for field in fields:
        if config.get(field) is not None:
            value = config[field]
            if not _is_int(value) or value < 1:
                raise UsageError(f"model config {path}: {field} must be a positive integer, got {value!r}")
            return value
    names = " / ".join(fields)
    raise UsageError(f"model config {path} has no {names} ({what}); is it a mixture-of-experts model?")


def from_hf_config(path: str | Path, tp_size: int = 1) -> MoEShape:
    """The MoE shape of a local Hugging Face config.json (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    config = _read_json_object(path)
    # Multimodal models keep the language model's fields under text_config.
    if not any(field in config for field in EXPERT_FIELDS) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]

    E = _field(config, EXPERT_FIELDS, path, "number of experts")
    topk = _field(config, TOPK_FIELDS, path, "experts per token")
    K = _field(config, HIDDEN_FIELDS, path, "hidden size")
    N = _field(config, INTERMEDIATE_FIELDS, path, "expert intermediate size")
    if topk > E:
        raise UsageError(f"model config {path}: num_experts_per_tok {topk} exceeds the {E} experts")

    renormalize = config.get("norm_topk_prob", True)  # Mixtral has no such field and always renormalizes
    if not isinstance(renormalize, bool):
        raise UsageError(f"model config {path}: norm_topk_prob must be true or false, got {renormalize!r}")

    num_layers = config.get("num_hidden_layers")
    if num_layers is not None:
        num_layers = _field(config, ("num_hidden_layers",), path, "layer count")
        dense = config.get("first_k_dense_replace") or 0  # DeepSeek's leading dense layers
        if not _is_int(dense) or not 0 <= dense < num_layers:
            raise UsageError(f"model config {path}: first_k_dense_replace {dense!r} is out of range")
        num_layers -= dense

    name_or_path = config.get("_name_or_path")
    name = name_or_path.rstrip("/").split("/")[-1] if isinstance(name_or_path, str) and name_or_path.strip("/") else None
    shape = MoEShape(E=E, N=N, K=K, topk=topk, name=name, renormalize=renormalize, num_layers=num_layers,
                     **_published_quantization(config, path))
    return split_for_tp(shape, tp_size)


def _published_quantization(config: Mapping[str, Any], path: Path) -> dict:
    """dtype and block_shape of an fp8 checkpoint's quantization_config (quant_method "fp8",
    weight_block_size [128, 128] or none: per tensor); nothing for other checkpoints."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
        return {}
    block = quantization.get("weight_block_size")
    if block is None:
        return {"dtype": FP8_W8A8}
    if not isinstance(block, list) or len(block) != 2 or not all(_is_int(v) and v > 0 for v in block):
        raise UsageError(f"model config {path}: quantization_config.weight_block_size must be [block_n, block_k], "
                         f"got {block!r}")
    return {"dtype": FP8_W8A8, "block_shape": (block[0], block[1])}


# ---------------------------------------------------------------- command-line flags


def _check_positive(flag: str, value: int | None) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise UsageError(f"{flag} must be a positive integer, got {value!r}")


def _check_agrees(flag: str, given: int | None, expected: int, source: str) -> None:
    if given is not None and given != expected:
        raise UsageError(f"{flag}={given} does not match {source}, which has {expected}")


def resolve_shapes(
    *,
    E: int | None = None,
    topk: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    model: str | None = None,
    model_config: str | Path | None = None,
    tp_size: int = 1,
) -> list[MoEShape]:
    """The shapes `moetune run` tunes, from its --model / --model-config / --E --topk flags."""
    if model is not None and model_config is not None:
        raise UsageError("--model and --model-config cannot be used together; pass one of them")
    for flag, value in (("--E", E), ("--topk", topk), ("--hidden", hidden), ("--intermediate", intermediate)):
        _check_positive(flag, value)
    if E is not None and topk is not None and E < topk:
        raise UsageError(f"--E ({E}) must be at least --topk ({topk})")

    if model is not None or model_config is not None:
        if model is not None:
            shape, source = get_preset(model), f"preset {model!r}"
        else:
            shape, source = from_hf_config(model_config), f"model config {model_config}"  # type: ignore[arg-type]
        _check_agrees("--E", E, shape.E, source)
        _check_agrees("--topk", topk, shape.topk, source)
        _check_agrees("--hidden", hidden, shape.K, source)
        _check_agrees("--intermediate", intermediate, shape.N, source)
        return [split_for_tp(shape, tp_size)]

    if (hidden is None) != (intermediate is None):
        given, missing = ("--hidden", "--intermediate") if hidden is not None else ("--intermediate", "--hidden")
        raise UsageError(f"{given} needs {missing} too")
    if E is None or topk is None:
        raise UsageError("pass --model, --model-config, or --E and --topk (with --hidden and --intermediate for a custom shape)")
    if hidden is not None and intermediate is not None:
        return [split_for_tp(MoEShape(E=E, N=intermediate, K=hidden, topk=topk), tp_size)]

    matches = presets_matching(E, topk)
    if not matches:
        raise UsageError(f"no built-in preset has E={E} and top-k={topk}; pass --hidden and --intermediate")
    return [split_for_tp(shape, tp_size) for shape in matches]


_BATCH_SIZE_ITEM = re.compile(r"[0-9]+")


def parse_batch_sizes(text: str) -> list[int]:
    """Parse "1,2,4" into sorted, unique, positive batch sizes, each at most MAX_BATCH_SIZE."""
    if not text.strip():
        raise UsageError("no batch sizes given; pass a comma-separated list such as 1,2,4")
    sizes = set()
    for item in text.split(","):
        item = item.strip()
        if not _BATCH_SIZE_ITEM.fullmatch(item) or int(item) < 1:
            raise UsageError(f"bad batch size {item!r} in {text!r}: each must be a positive integer")
        if int(item) > MAX_BATCH_SIZE:
            raise UsageError(f"batch size {item} is above the maximum, {MAX_BATCH_SIZE}")
        sizes.add(int(item))
    return sorted(sizes)
