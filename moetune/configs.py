"""Launch configs of the grouped GEMM: the six keys, their validation and the default heuristic."""

from __future__ import annotations

from typing import Any, Mapping

# Shared memory a block may opt in to on Hopper (H100, H200): the limit assumed when none is known.
HOPPER_SHARED_MEMORY_BYTES = 232448

CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
BLOCK_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")
# Smallest tile a Triton dot accepts along each axis.
MIN_BLOCK_SIZE = 16


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def value_problem(key: str, value: Any) -> str | None:
    """Why `value` cannot be a config's `key` ("must be ..., got ..."), or None if it can."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an int, got {value!r}"
    if value <= 0:
        return f"must be positive, got {value}"
    if key in BLOCK_KEYS and (value < MIN_BLOCK_SIZE or not _is_power_of_two(value)):
        return f"must be a power of two >= {MIN_BLOCK_SIZE}, got {value}"
    if key == "num_warps" and not _is_power_of_two(value):
        return f"must be a power of two, got {value}"
    return None


def check_config(config: Any, what: str = "config") -> dict[str, int]:
    """Return a clean copy of a launch config, or raise naming the bad key.

    TypeError for a non-mapping or a non-integer value, ValueError for a missing key or a
    value out of range. Extra keys (e.g. SGLang's USE_TMA) are dropped.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"{what} must be a dict with keys {', '.join(CONFIG_KEYS)}, got {type(config).__name__}")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{what} is missing key(s) {', '.join(missing)}")
    clean: dict[str, int] = {}
    for key in CONFIG_KEYS:
        value = config[key]
        problem = value_problem(key, value)
        if problem is not None:
            error = TypeError if isinstance(value, bool) or not isinstance(value, int) else ValueError
            raise error(f"{what}[{key!r}] {problem}")
        clean[key] = value
    return clean


def default_config(M: int, E: int, N: int, K: int, topk: int, *,
                   shared_memory_bytes: int | None = None) -> dict[str, int]:
    """The untuned launch config used when no table has one.

    The expected rows per expert, M * topk / E, picks the tile: few rows are memory-bound
    (each expert's weights stream once), so a short BLOCK_SIZE_M wastes the fewest padded
    rows; many rows want large tiles for reuse. Stages shrink until the pipeline fits
    `shared_memory_bytes` (Hopper's when unknown).
    """
    rows_per_expert = max(1, M * topk // max(E, 1))
    if rows_per_expert <= 8:
        config = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    elif rows_per_expert <= 24:
        config = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    elif rows_per_expert <= 48:
        config = dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=8, num_warps=4, num_stages=3)
    elif rows_per_expert <= 96:
        config = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=4, num_stages=4)
    else:
        config = dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=16, num_warps=8, num_stages=4)
    limit = shared_memory_bytes or HOPPER_SHARED_MEMORY_BYTES
    # Sized for 2-byte operands; fp32 inputs run as tf32 with 4 bytes but the same tiles.
    while config["num_stages"] > 2 and shared_memory_estimate(config, 2) > limit:
        config["num_stages"] -= 1
    while shared_memory_estimate(config, 2) > limit and config["BLOCK_SIZE_N"] > 32:
        config["BLOCK_SIZE_N"] //= 2
    return config


def shared_memory_estimate(config: Mapping[str, int], dtype_bytes: int) -> int:
    """Bytes of shared memory one program needs.

    Each pipeline stage buffers one A tile (BM x BK) and one B tile (BK x BN); the epilogue's
    BM x BN output tile reuses that memory once the loop is done, so the larger of the two counts.
    """
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    pipeline = config["num_stages"] * (bm * bk + bk * bn) * dtype_bytes
    epilogue = bm * bn * dtype_bytes
    return max(pipeline, epilogue)
