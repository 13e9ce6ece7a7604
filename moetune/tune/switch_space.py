"""The kernel switches as a dimension of the search space: the values a tune may try, the
order it tries them in, and every rule that prunes a switch set before it is timed.

The role studies tune the six launch-config keys with every switch off; the layer choice
(switch_search.py) then tries switch sets on top of the pairs they measured. A switch set
is a candidate for one pair of configs at one batch size unless a rule below says why not.
The rules, in the order they are checked, one line of why each:

  tma_device        TMA needs a Hopper or newer GPU (the interpreter runs the descriptor loads).
  tma_box           a tensor map's box sides are at most 256 and its rows 16-byte aligned.
  sorted_block_m    sorted_rows: GEMM 2 reads GEMM 1's aligned rows, so one BLOCK_SIZE_M for both.
  fused_shared_memory  fuse_activation: GEMM 1 holds a gate and an up weight tile per stage.
  split_k_grid      split-K pays only where a GEMM's output tiles leave SMs without work.
  split_k_programs  more than SPLIT_K_MAX_WAVES programs per SM queue instead of streaming.
  split_k_whole_tiles  each split gets the same whole number of BLOCK_SIZE_K tiles, or splits idle.
  persistent_grid   a worst-case grid under PERSISTENT_MIN_WAVES waves has little surplus to skip.
  sorted_rows_band  the sorted rows (and their TMA loads) only from SORTED_ROWS_FROM_ROWS_PER_EXPERT.
  fuse_activation_band  no fused SiLU in FUSE_ACTIVATION_SKIPPED_ROWS_PER_EXPERT.
  persistent_band   the persistent schedule only from PERSISTENT_FROM_ROWS_PER_EXPERT.

The band rules go by the mean rows each expert's GEMMs get at that batch size (M * topk /
the experts routed to); their bands are measured on the H200 (below, each constant says where),
so they hold on a GPU only: in the interpreter, whose times mean nothing, every band is open.

Invalid combinations (tma_activations without sorted_rows, fuse_activation with split_k) are
never built: Switches refuses them (the kernels' rule, kernels/switches.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from ..errors import UsageError
from ..types import SPLIT_K_CHOICES, LaunchConfig, Switches, SwitchError

if TYPE_CHECKING:
    from .space import Problem

SWITCH_NAMES = tuple(field.name for field in fields(Switches))
OFF_VALUES = {field.name: field.default for field in fields(Switches)}

# TMA boxes: the hardware's tensor-map limit per side, and the row alignment it needs.
TMA_MAX_BOX = 256
TMA_ROW_ALIGNMENT_BYTES = 16
# Split-K: programs per SM beyond which more splits only queue (and add partial traffic).
SPLIT_K_MAX_WAVES = 4
# Persistent: the worst-case grid must hold at least this many tiles per SM: with fewer each
# program loops once or twice, and its set-up (the TMA descriptors) costs what it saves.
PERSISTENT_MIN_WAVES = 4
# Bands of mean rows per expert, measured on the H200 (docs/performance.md section 4, the
# ablation of the Qwen3-30B-A3B tune; docs/layer.md, the switch probe), rows per expert being
# M * 8 / 128 = M / 16 for Qwen3 and M * 8 / 256 = M / 32 for DeepSeek-V3 at TP4:
# - sorted_rows earned 1.3-3.9% from 256 rows (Qwen3 M >= 4096) and SGLang's sorted-plus-TMA
#   path 4.6-5.6% from 128 (DeepSeek-V3 TP4 M >= 4096); below 128 it earned at most 0.3% in
#   bf16 (under ADOPT_MARGIN) and 0.8% over Qwen3 fp8's M = 512-2048, and lost up to 14% at M = 1.
SORTED_ROWS_FROM_ROWS_PER_EXPERT = 128
# - fuse_activation earned 0.4-2.5% up to 16 rows (Qwen3 M <= 256) and 4-5% at 512 (DeepSeek-V3
#   TP4 M = 16384); from 32 to 128 it earned nothing (Qwen3 M = 512-2048) or lost 1-4%
#   (DeepSeek-V3 TP4 M = 1024, 4096). [low, high): the rows per expert where it is not tried.
FUSE_ACTIVATION_SKIPPED_ROWS_PER_EXPERT = (32, 256)
# - persistent earned 2.3-3.9% from 256 rows (Qwen3 M >= 4096, on top of the TMA loads); below it
#   earned nothing in the Qwen3 tune, and alone it was 9-56% slower at every M the probe timed.
#   (The worst-case grid that persistent_grid counts holds E * BLOCK_SIZE_M padding rows, so
#   that rule alone keeps it at nearly every batch size.)
PERSISTENT_FROM_ROWS_PER_EXPERT = 256

# The families of switches the layer choice tries, in its order, each as the settings it
# tries on top of the best layer so far (see switch_search.py for why this order).
FAMILIES: tuple[tuple[str, tuple[Mapping[str, Any], ...]], ...] = (
    ("split_k", ()),  # one setting per split_k value of the space
    ("fuse_activation", ({"fuse_activation": True},)),
    ("sorted_rows", ({"sorted_rows": True}, {"sorted_rows": True, "tma_activations": True},
                     {"sorted_rows": True, "tma_activations": True, "tma_weights": True})),
    ("tma_weights", ({"tma_weights": True},)),
    ("persistent", ({"persistent": True},)),
)


@dataclass(frozen=True)
class SwitchSpace:
    """The values of each switch the layer choice may try; each holds the off value (the role
    studies tune with every switch off, so the plain kernel is always measured)."""

    values: Mapping[str, tuple]

    def __post_init__(self) -> None:
        if set(self.values) != set(SWITCH_NAMES):
            raise ValueError(f"a switch space needs exactly the switches {', '.join(SWITCH_NAMES)}")
        normalized = {name: tuple(sorted(set(self.values[name]))) for name in SWITCH_NAMES}
        object.__setattr__(self, "values", normalized)

    @classmethod
    def off(cls) -> "SwitchSpace":
        return cls({name: (value,) for name, value in OFF_VALUES.items()})

    @property
    def searches(self) -> bool:
        """Whether any switch may be on."""
        return any(len(choices) > 1 for choices in self.values.values())

    def to_dict(self) -> dict[str, list]:
        return {name: list(choices) for name, choices in self.values.items()}

    def allows(self, switches: Switches) -> bool:
        return all(getattr(switches, name) in self.values[name] for name in SWITCH_NAMES)

    def families(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """(family, the settings of it this space allows), in the order they are tried."""
        for family, settings in FAMILIES:
            if family == "split_k":
                settings = tuple({"split_k": value} for value in self.values["split_k"] if value > 1)
            allowed = [dict(setting) for setting in settings
                       if all(value in self.values[name] for name, value in setting.items())]
            if allowed:
                yield family, allowed


def read_switch_space(raw: Any, source: str) -> dict[str, tuple]:
    """The switch values a space file's `switches:` gives (`off` or false: every switch off)."""
    where = f"{source}: switches"
    if raw is False:
        return SwitchSpace.off().values
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: must be off or a mapping of switch names to lists, got {raw!r}")
    chosen = {}
    for name, choices in raw.items():
        if name not in SWITCH_NAMES:
            raise UsageError(f"{where}: {name}: unknown switch, expected some of {', '.join(SWITCH_NAMES)}")
        off = OFF_VALUES[name]
        allowed = SPLIT_K_CHOICES if name == "split_k" else (False, True)
        if not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: {name}: must be a non-empty list, got {choices!r}")
        for value in choices:
            if type(value) is not type(off) or value not in allowed:
                raise UsageError(f"{where}: {name}: each value must be one of "
                                 f"{', '.join(map(_yaml_word, allowed))}, got {_yaml_word(value)}")
        if off not in choices:
            raise UsageError(f"{where}: {name}: must include {_yaml_word(off)} (the plain kernel, which the "
                             f"role studies tune, is always measured)")
        chosen[name] = tuple(choices)
    return chosen


def _yaml_word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class LayerTarget:
    """What the rules look at besides the configs: the layer's sizes at one batch size and
    the device (sm_count: programs one wave holds, the persistent grid's size)."""

    M: int
    E: int
    N: int
    K: int
    topk: int
    dtype_bytes: int
    shared_memory_bytes: int
    sm_count: int
    compute_capability: tuple[int, int] | None  # None: Triton's interpreter
    global_experts: int | None = None  # expert parallelism: the experts routed to (None: E)

    @property
    def rows_per_expert(self) -> float:
        """Mean rows each expert's GEMMs get: M * topk over the experts routed to."""
        return self.M * self.topk / (self.global_experts or self.E)

    @property
    def measured_bands(self) -> bool:
        """Whether the band rules hold: on a GPU, where they were measured."""
        return self.compute_capability is not None

    def problem(self, gemm: str) -> Problem:
        return _problem(self, gemm)


@functools.lru_cache(maxsize=64)
def _problem(target: LayerTarget, gemm: str) -> Problem:
    """Cached: the rules ask it for every pair of a pool."""
    from .space import Problem  # space.py reads its `switches:` section through this module

    t = target
    return Problem.for_gemm(gemm, t.M, t.E, t.N, t.K, t.topk, t.dtype_bytes, routed_experts=t.global_experts)


def _output_tiles(problem: Problem, config: LaunchConfig) -> int:
    """Programs of the worst-case grid of one GEMM (no split)."""
    return problem.num_m_blocks(config.block_m) * math.ceil(problem.n_out / config.block_n)


def _tma_device(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    capability = t.compute_capability
    if (s.tma_weights or s.tma_activations) and capability is not None and tuple(capability) < (9, 0):
        return f"TMA needs compute capability 9.0 or newer, the device has {capability[0]}.{capability[1]}"
    return None


def _tma_box(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    boxes = []
    if s.tma_weights:
        boxes += [("GEMM 1 weight", gemm1.block_n, gemm1.block_k, t.K), ("GEMM 2 weight", gemm2.block_n, gemm2.block_k,
                                                                         t.N)]
    if s.tma_activations:
        boxes.append(("GEMM 2 activation", gemm2.block_m, gemm2.block_k, t.N))
    for what, rows, columns, row_length in boxes:
        if max(rows, columns) > TMA_MAX_BOX:
            return f"{what} box {rows}x{columns} has a side over {TMA_MAX_BOX}"
        if row_length * t.dtype_bytes % TMA_ROW_ALIGNMENT_BYTES:
            return f"{what} rows of {row_length * t.dtype_bytes} B are not {TMA_ROW_ALIGNMENT_BYTES}-byte aligned"
    return None


def _sorted_block_m(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    return s.config_problem(gemm1, gemm2)


def _fused_shared_memory(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    if not s.fuse_activation:
        return None
    unfit = gemm1.fit_problem(t.dtype_bytes, t.shared_memory_bytes, weight_tiles=s.weight_tiles)
    return None if unfit is None else f"fuse_activation: GEMM 1 with gate and up tiles: {unfit}"


def _split_k_tiles(t: LayerTarget, gemm1: LaunchConfig, gemm2: LaunchConfig) -> int:
    """Output tiles of the GEMM with fewer: split-K runs in both, and pays where either
    leaves SMs without a tile to stream weights for."""
    return min(_output_tiles(t.problem("gemm1"), gemm1), _output_tiles(t.problem("gemm2"), gemm2))


def _split_k_grid(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    if s.split_k > 1 and _split_k_tiles(t, gemm1, gemm2) > t.sm_count:
        return f"split_k: each GEMM has more output tiles than SMs ({t.sm_count})"
    return None


def _split_k_programs(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    tiles = _split_k_tiles(t, gemm1, gemm2) if s.split_k > 1 else 0
    if tiles * s.split_k > SPLIT_K_MAX_WAVES * t.sm_count:
        return f"split_k {s.split_k}: {tiles} tiles x {s.split_k} > {SPLIT_K_MAX_WAVES} programs per SM"
    return None


def _split_k_whole_tiles(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    if s.split_k == 1:
        return None
    for what, config, k_in in (("GEMM 1", gemm1, t.K), ("GEMM 2", gemm2, t.N)):
        k_tiles = math.ceil(k_in / config.block_k)
        if k_tiles % s.split_k:
            return f"split_k {s.split_k}: {what}'s {k_tiles} K tiles of {config.block_k} do not split evenly"
    return None


def _persistent_grid(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    if not s.persistent:
        return None
    tiles = max(_output_tiles(t.problem("gemm1"), gemm1), _output_tiles(t.problem("gemm2"), gemm2))
    if tiles < PERSISTENT_MIN_WAVES * t.sm_count:
        return f"persistent: the largest grid has {tiles} programs, under {PERSISTENT_MIN_WAVES} per SM"
    return None


def _from_rows_per_expert(switch: str, threshold: int):
    """The rule that keeps `switch` off below `threshold` mean rows per expert, where the
    measurements found it earning nothing."""

    def rule(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
        if getattr(s, switch) and t.measured_bands and t.rows_per_expert < threshold:
            return f"{switch}: {t.rows_per_expert:g} rows per expert, under the {threshold} from which it earned"
        return None

    return rule


def _fuse_activation_band(s: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, t: LayerTarget) -> str | None:
    low, high = FUSE_ACTIVATION_SKIPPED_ROWS_PER_EXPERT
    if s.fuse_activation and t.measured_bands and low <= t.rows_per_expert < high:
        return f"fuse_activation: {t.rows_per_expert:g} rows per expert, where it earned nothing ({low} to {high})"
    return None


# name -> rule, in the order they are checked (the module's docstring says why each).
SWITCH_RULES = {
    "tma_device": _tma_device,
    "tma_box": _tma_box,
    "sorted_block_m": _sorted_block_m,
    "fused_shared_memory": _fused_shared_memory,
    "split_k_grid": _split_k_grid,
    "split_k_programs": _split_k_programs,
    "split_k_whole_tiles": _split_k_whole_tiles,
    "persistent_grid": _persistent_grid,
    "sorted_rows_band": _from_rows_per_expert("sorted_rows", SORTED_ROWS_FROM_ROWS_PER_EXPERT),
    "fuse_activation_band": _fuse_activation_band,
    "persistent_band": _from_rows_per_expert("persistent", PERSISTENT_FROM_ROWS_PER_EXPERT),
}
# The rules that look at the switches, the batch size and the device only: what they prune,
# they prune on every pair of configs.
PAIR_FREE_RULES = ("tma_device", "sorted_rows_band", "fuse_activation_band", "persistent_band")


def switch_prune_reason(switches: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig, target: LayerTarget,
                        rules: Iterable[str] = SWITCH_RULES) -> str | None:
    """None when `switches` may run with these configs at this batch size, else why not
    (`rules`: the names of those to check, in SWITCH_RULES' order; default all)."""
    for name in (name for name in SWITCH_RULES if name in rules):
        reason = SWITCH_RULES[name](switches, gemm1, gemm2, target)
        if reason is not None:
            return reason
    return None


def with_setting(switches: Switches, setting: Mapping[str, Any]) -> Switches | None:
    """`switches` with `setting` on top; None when the kernels cannot run the combination."""
    try:
        return replace(switches, **setting)
    except SwitchError:
        return None
