"""The whole layers a tune measured at one batch size, one per kernel-switch candidate.

A table keeps them beside each batch size's entry, under SWITCH_CANDIDATES_KEY (a key the
schema leaves to its writers: the dispatcher never reads it), so that without tuning again
an export can fall back to the best layer another framework runs, and scripts/ablation.py
can say what each switch earned. Configs are written as their six values in CONFIG_KEYS
order, to keep tables short:

    "switch_candidates": [
      {"variant": "unfused", "switches": {}, "gemm1": [64, 128, 64, 1, 4, 3],
       "gemm2": [64, 64, 128, 8, 4, 3], "layer_us": 812.4, "status": "measured"}, ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .types import CONFIG_KEYS, OFF, LaunchConfig, Switches, Variant

SWITCH_CANDIDATES_KEY = "switch_candidates"
MEASURED = "measured"  # passed the correctness check and timed
STATUSES = (MEASURED, "wrong_result", "launch_failed")
# SGLang's TMA path: with "USE_TMA" in its `_down` config, GEMM 1 writes sorted rows and
# GEMM 2 loads both operands through TMA.
SGLANG_TMA = Switches(sorted_rows=True, tma_activations=True, tma_weights=True)


def sglang_runs(switches: Switches) -> bool:
    """Whether SGLang's Triton fused MoE runs this path: the plain one or its TMA path."""
    return switches in (OFF, SGLANG_TMA)


def vllm_runs(switches: Switches) -> bool:
    """Whether vLLM's Triton fused MoE runs this path: the plain one only."""
    return switches == OFF


@dataclass(frozen=True)
class LayerCandidate:
    variant: Variant
    switches: Switches
    gemm1: LaunchConfig
    gemm2: LaunchConfig
    layer_us: float | None  # None unless measured
    status: str = MEASURED

    @property
    def measured(self) -> bool:
        return self.status == MEASURED and self.layer_us is not None

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant.value, "switches": self.switches.to_json(),
                "gemm1": list(self.gemm1.to_json().values()), "gemm2": list(self.gemm2.to_json().values()),
                "layer_us": self.layer_us, "status": self.status}

    @classmethod
    def from_json(cls, data: Any, what: str) -> "LayerCandidate":
        """Read one; a bad one raises ValueError naming `what` and the key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{what}: must be an object, got {type(data).__name__}")
        try:
            variant = Variant.parse(data.get("variant"), f"{what}.variant")
            switches = Switches.from_json(data.get("switches"), f"{what}.switches")
            gemm1, gemm2 = (_config(data.get(key), f"{what}.{key}") for key in ("gemm1", "gemm2"))
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None
        status, layer_us = data.get("status"), data.get("layer_us")
        if status not in STATUSES:
            raise ValueError(f"{what}.status: must be one of {', '.join(STATUSES)}, got {status!r}")
        if layer_us is not None and (isinstance(layer_us, bool) or not isinstance(layer_us, (int, float))
                                     or not layer_us > 0):
            raise ValueError(f"{what}.layer_us: must be a positive number or null, got {layer_us!r}")
        return cls(variant, switches, gemm1, gemm2, None if layer_us is None else float(layer_us), status)


def _config(values: Any, what: str) -> LaunchConfig:
    if not isinstance(values, list) or len(values) != len(CONFIG_KEYS):
        raise ValueError(f"{what}: must be a list of the {len(CONFIG_KEYS)} values of {', '.join(CONFIG_KEYS)}")
    return LaunchConfig.from_json(dict(zip(CONFIG_KEYS, values)), what)


def candidates_of(entry: Mapping, what: str = "batch size") -> list[LayerCandidate]:
    """The candidates a batch size's entry (its JSON form) records; none for a table that
    records none (hand-written, or tuned before switches were searched)."""
    raw = entry.get(SWITCH_CANDIDATES_KEY, [])
    if not isinstance(raw, list):
        raise ValueError(f"{what}.{SWITCH_CANDIDATES_KEY}: must be a list")
    return [LayerCandidate.from_json(item, f"{what}.{SWITCH_CANDIDATES_KEY}[{index}]") for index, item in enumerate(raw)]


def fastest(candidates: Iterable[LayerCandidate]) -> LayerCandidate | None:
    """The measured candidate with the least layer time, or None."""
    return min((c for c in candidates if c.measured), key=lambda c: c.layer_us, default=None)
