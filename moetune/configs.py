"""Launch configs of the grouped GEMM: the six keys, their validation, the default heuristic
and the short form tables are shown in."""

from __future__ import annotations

from typing import Mapping

from .types import CONFIG_KEYS, HOPPER_SHARED_MEMORY_BYTES, LaunchConfig, value_problem  # noqa: F401


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
    """Bytes of shared memory one program of this config needs (LaunchConfig.shared_memory_bytes)."""
    return LaunchConfig.from_json(config, unknown="ignore").shared_memory_bytes(dtype_bytes)


def compact_config(config: LaunchConfig | Mapping[str, int]) -> str:
    """A config in one short word per key, e.g. `M64 N128 K64 G8 w4 s3`."""
    if isinstance(config, LaunchConfig):
        config = config.to_json()
    return (
        f"M{config['BLOCK_SIZE_M']} N{config['BLOCK_SIZE_N']} K{config['BLOCK_SIZE_K']} "
        f"G{config['GROUP_SIZE_M']} w{config['num_warps']} s{config['num_stages']}"
    )
