"""The vocabulary every module shares: launch configs, the layer's variants and the tuner's roles.

A `LaunchConfig` is the one typed form of a grouped-GEMM launch config; JSON files (tables,
vLLM/SGLang files, user dicts) come in through `LaunchConfig.from_json` and go out through
`to_json`, and every rule a config value must obey lives here.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields

from .device import HOPPER_SHARED_MEMORY_BYTES  # noqa: F401 - part of this vocabulary
# Importing the kernels defines them: the `moetune` command chooses the interpreter before
# anything imports this module (its package and device.py import no kernel).
from .kernels.switches import KernelSwitches
from typing import Any, Iterable, Mapping

# Smallest tile a Triton dot accepts along each axis.
MIN_BLOCK_SIZE = 16
# Upper bounds: beyond them no GPU compiles the kernel (or index arithmetic overflows int32).
MAX_BLOCK_SIZE = 512
MAX_GROUP_SIZE_M = 1024
MAX_NUM_WARPS = 32  # 1024 threads per block
MAX_NUM_STAGES = 16
# fp32 accumulator registers per thread above which ptxas spills (255 registers in all) and
# compiles for minutes: 128x256 with 8 warps, the largest tile vLLM/SGLang ship, needs 128.
MAX_ACCUMULATOR_REGISTERS = 128


class Variant(str, enum.Enum):
    """The last step of the layer: GEMM 2 stores [M, topk, K] and a reduce sums over top-k
    (UNFUSED), or GEMM 2 atomically adds into out[M, K] (FUSED)."""

    UNFUSED = "unfused"
    FUSED = "fused"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any, what: str = "variant") -> "Variant":
        try:
            return cls(value)
        except ValueError:
            names = " or ".join(repr(v.value) for v in cls)
            raise ValueError(f"{what} must be {names}, got {value!r}") from None


class Gemm(str, enum.Enum):
    """The layer's two GEMMs; a table entry holds one config for each."""

    GEMM1 = "gemm1"  # hidden [.., K] x w1 -> gate/up [.., 2N]
    GEMM2 = "gemm2"  # activation [.., N] x w2 -> [.., K], times the router weight

    def __str__(self) -> str:
        return self.value


class Role(str, enum.Enum):
    """What one tuning study searches: GEMM 1 (shared by both variants) or GEMM 2 with the
    epilogue of one variant."""

    GEMM1 = "gemm1"
    GEMM2_UNFUSED = "gemm2_unfused"
    GEMM2_FUSED = "gemm2_fused"

    def __str__(self) -> str:
        return self.value

    @property
    def gemm(self) -> Gemm:
        return Gemm.GEMM1 if self is Role.GEMM1 else Gemm.GEMM2

    @property
    def variant(self) -> Variant | None:
        """The variant whose GEMM 2 this role tunes; None for GEMM 1."""
        return {Role.GEMM2_UNFUSED: Variant.UNFUSED, Role.GEMM2_FUSED: Variant.FUSED}.get(self)

    @classmethod
    def down(cls, variant: Variant) -> "Role":
        """The GEMM 2 role of a variant."""
        return cls.GEMM2_FUSED if Variant(variant) is Variant.FUSED else cls.GEMM2_UNFUSED

    @classmethod
    def for_variants(cls, variants: Iterable[Variant]) -> list["Role"]:
        """The roles a tune of these variants runs: GEMM 1 and each variant's GEMM 2."""
        wanted = {Variant(v) for v in variants}
        return [cls.GEMM1] + [cls.down(v) for v in Variant if v in wanted]


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# JSON key -> dataclass field, in the order the frameworks write them.
_JSON_KEYS = {
    "BLOCK_SIZE_M": "block_m",
    "BLOCK_SIZE_N": "block_n",
    "BLOCK_SIZE_K": "block_k",
    "GROUP_SIZE_M": "group_m",
    "num_warps": "num_warps",
    "num_stages": "num_stages",
}
CONFIG_KEYS = tuple(_JSON_KEYS)
BLOCK_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")
# Keys other projects write that moetune's kernel has no use for: dropped without a word.
KNOWN_FOREIGN_KEYS = frozenset({"USE_TMA"})


def value_problem(key: str, value: Any) -> str | None:
    """Why `value` cannot be a config's `key` ("must be ..., got ..."), or None if it can."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an int, got {value!r}"
    if value <= 0:
        return f"must be positive, got {value}"
    if key in BLOCK_KEYS:
        if value < MIN_BLOCK_SIZE or not _is_power_of_two(value):
            return f"must be a power of two >= {MIN_BLOCK_SIZE}, got {value}"
        if value > MAX_BLOCK_SIZE:
            return f"must be at most {MAX_BLOCK_SIZE}, got {value}"
    if key == "num_warps" and (not _is_power_of_two(value) or value > MAX_NUM_WARPS):
        return f"must be a power of two <= {MAX_NUM_WARPS}, got {value}"
    if key == "num_stages" and value > MAX_NUM_STAGES:
        return f"must be at most {MAX_NUM_STAGES}, got {value}"
    if key == "GROUP_SIZE_M" and value > MAX_GROUP_SIZE_M:
        return f"must be at most {MAX_GROUP_SIZE_M}, got {value}"
    return None


class ConfigError(ValueError):
    """A launch config that breaks a rule; the message names the key."""


@dataclass(frozen=True, order=True)
class LaunchConfig:
    """One launch of the grouped GEMM: its tile, its program order and its pipeline."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for key, name in _JSON_KEYS.items():
            problem = value_problem(key, getattr(self, name))
            if problem is not None:
                raise ConfigError(f"{key} {problem}")

    @classmethod
    def from_json(cls, data: Any, what: str = "config", *, unknown: str = "reject") -> "LaunchConfig":
        """Read a config from its JSON form (the six keys of vLLM's and SGLang's files).

        unknown: "reject" raises on a key the kernel does not know, "ignore" drops it
        (callers that warn list the dropped keys with `unknown_keys`). Keys of
        KNOWN_FOREIGN_KEYS are always dropped. Errors name `what` and the key.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"{what} must be a dict with keys {', '.join(CONFIG_KEYS)}, got {type(data).__name__}")
        missing = [key for key in CONFIG_KEYS if key not in data]
        if missing:
            raise ConfigError(f"{what} is missing key(s) {', '.join(missing)}")
        extra = unknown_keys(data)
        if extra and unknown == "reject":
            raise ConfigError(f"{what}[{extra[0]!r}]: unknown key, expected {', '.join(CONFIG_KEYS)}")
        values = {}
        for key, name in _JSON_KEYS.items():
            value = data[key]
            problem = value_problem(key, value)
            if problem is not None:
                error = TypeError if isinstance(value, bool) or not isinstance(value, int) else ConfigError
                raise error(f"{what}[{key!r}] {problem}")
            values[name] = value
        return cls(**values)

    def to_json(self) -> dict[str, int]:
        """The JSON form, keys in the frameworks' order."""
        return {key: getattr(self, name) for key, name in _JSON_KEYS.items()}

    def replace(self, **changes: int) -> "LaunchConfig":
        return LaunchConfig(**{**asdict(self), **changes})

    def shared_memory_bytes(self, dtype_bytes: int, weight_tiles: int = 1) -> int:
        """Bytes of shared memory one program needs.

        Each pipeline stage buffers one A tile (BM x BK) and `weight_tiles` B tiles (BK x BN;
        two when GEMM 1 computes gate and up together); the epilogue's BM x BN output tile
        reuses that memory once the loop is done, so the larger of the two counts.
        """
        pipeline = self.num_stages * (self.block_m * self.block_k
                                      + weight_tiles * self.block_k * self.block_n) * dtype_bytes
        return max(pipeline, self.block_m * self.block_n * dtype_bytes)

    def accumulator_registers(self, weight_tiles: int = 1) -> int:
        """fp32 accumulator registers each thread holds (one accumulator per weight tile)."""
        return weight_tiles * self.block_m * self.block_n // (32 * self.num_warps)

    def fit_problem(self, dtype_bytes: int, shared_memory_limit: int, weight_tiles: int = 1) -> str | None:
        """Why this config cannot run well on a device with this much shared memory per
        block (it would not launch, or ptxas would spill), or None when it fits."""
        smem = self.shared_memory_bytes(dtype_bytes, weight_tiles)
        if smem > shared_memory_limit:
            return f"shared memory {smem} B > limit {shared_memory_limit} B"
        registers = self.accumulator_registers(weight_tiles)
        if registers > MAX_ACCUMULATOR_REGISTERS:
            return (f"{self.block_m}x{self.block_n} tile on {self.num_warps} warps needs {registers} "
                    f"accumulator registers per thread (> {MAX_ACCUMULATOR_REGISTERS})")
        return None


def unknown_keys(data: Mapping) -> list[str]:
    """Keys of a config's JSON form that neither the kernel nor KNOWN_FOREIGN_KEYS name."""
    return [str(key) for key in data if key not in _JSON_KEYS and key not in KNOWN_FOREIGN_KEYS]


SPLIT_K_CHOICES = (1, 2, 4, 8, 16)


class SwitchError(ValueError):
    """A kernel switch value, or a combination of them, that the kernels cannot run."""


@dataclass(frozen=True)
class Switches(KernelSwitches):
    """Compile-time switches of the expert kernels for one layer (both GEMMs); all off is
    the plain path: GEMM 1 stores by slot, a SiLU-and-mul kernel, GEMM 2 gathers its rows.
    The kernels' KernelSwitches with what a table needs besides: its JSON form and the
    values a table may hold; which combinations run is the kernels' rule (validate()).

    sorted_rows: GEMM 1 writes rows in aligned order and GEMM 2 reads them so (both
        configs then share one BLOCK_SIZE_M). fuse_activation: SiLU-and-mul in GEMM 1's
        epilogue. tma_weights / tma_activations: weight tiles / GEMM 2's sorted A tiles load
        through tensor descriptors (TMA). split_k: the K range split over programs (small
        M). persistent: about one program per SM looping over the live tiles.
    """

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "split_k":
                if isinstance(value, bool) or value not in SPLIT_K_CHOICES:
                    raise SwitchError(f"split_k must be one of {', '.join(map(str, SPLIT_K_CHOICES))}, got {value!r}")
            elif not isinstance(value, bool):
                raise SwitchError(f"{field.name} must be true or false, got {value!r}")
        try:
            self.validate()
        except ValueError as error:
            raise SwitchError(str(error)) from None

    @classmethod
    def from_json(cls, data: Any, what: str = "switches") -> "Switches":
        """Read switches written by to_json; a key or value the kernels do not know is named."""
        if not isinstance(data, Mapping):
            raise SwitchError(f"{what} must be an object of switch names, got {type(data).__name__}")
        known = {field.name for field in fields(cls)}
        for key in data:
            if key not in known:
                raise SwitchError(f"{what}: unknown switch {key!r}, expected some of {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except SwitchError as error:
            raise SwitchError(f"{what}: {error}") from None

    def to_json(self) -> dict[str, Any]:
        """The switches that differ from off (an empty object is the plain path)."""
        return {field.name: getattr(self, field.name) for field in fields(self)
                if getattr(self, field.name) != field.default}

    @property
    def weight_tiles(self) -> int:
        """B tiles a GEMM 1 program holds per stage: two when it computes gate and up together."""
        return 2 if self.fuse_activation else 1

    def config_problem(self, gemm1: LaunchConfig, gemm2: LaunchConfig) -> str | None:
        """Why the two GEMMs' configs cannot run with these switches (the kernels' rule), or None."""
        try:
            self.check_configs(gemm1.to_json(), gemm2.to_json())
        except ValueError as error:
            return str(error)
        return None


OFF = Switches()
