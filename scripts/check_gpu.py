"""Correctness and speed of the MoE layer on a GPU with the anchor's shipped configs.

1. Both variants vs the float64 reference, bf16 and fp16, for the anchor shapes.
2. Every valid combination of the kernel switches (kernels/switches.py), both variants, vs the
   float64 reference, bf16, for the shapes in --switch-shapes at the batch sizes --switch-m,
   with the shipped configs of the largest of those M (one build per combination); where a
   switch set needs it, GEMM 2 takes GEMM 1's BLOCK_SIZE_M (sorted rows, as SGLang does) and
   GEMM 1 fewer pipeline stages (SiLU in its epilogue holds two weight tiles).
3. Per shape and M: unfused µs, fused µs (relaxed atomics, and acq_rel for M >= 1024) with
   the shipped configs, the layer as the dispatcher runs it (`tuned`: the packaged or user
   table's variant, configs and switches, else the default heuristic), the ratio to the
   roofline floor, and the anchor beside them: SGLang 0.5.23's best path for that point on an
   H200, its sorted-rows + TMA path where that is faster (measured 2026-12-01; the figures are
   packaged in moetune/baselines/sglang-vllm-h200/anchors.json).
Timing (moetune.measure): 10 layer calls per CUDA graph, median of 20 replays, routing and
alignment outside.

    python scripts/check_gpu.py [--out DIR] [--shapes qwen3,qwen2,deepseek] [--m 1,4,...]
                                [--switch-shapes qwen3] [--switch-m 3,1024]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from moetune.bench import make_weights, roofline_floor_us
from moetune.baseline_configs import Anchor, find_anchor, packaged_baselines
from moetune.export import nearest, read_foreign_configs
from moetune.loader import get_config
from moetune.measure import LayerCase, check, time_interleaved
from moetune.reference import TOLERANCE
from moetune.tables import write_atomic
from moetune.device import local_device
from moetune.types import LaunchConfig, Switches, SwitchError

BASELINE = "sglang-vllm-h200"  # the anchor's configs and figures, packaged with moetune
ANCHOR_DEVICE = "NVIDIA H200"  # the device of the anchor figures
M_VALUES = [1, 4, 16, 64, 256, 1024, 4096, 16384]
CHECK_DTYPES = (torch.bfloat16, torch.float16)

# name -> (E, topk, K = hidden, N = intermediate, GEMM 1 file, GEMM 2 file or None)
SHAPES = {
    "qwen3": ("Qwen3-30B-A3B", 128, 8, 2048, 768, "E=128,N=768,device_name=NVIDIA_H200.json", None),
    "qwen2": ("Qwen2-57B-A14B", 64, 8, 3584, 2560, "E=64,N=2560,device_name=NVIDIA_H200.json", None),
    "deepseek": ("DeepSeek-V3-TP4", 256, 8, 7168, 512, "E=256,N=512,device_name=NVIDIA_H200.json",
                 "E=256,N=512,device_name=NVIDIA_H200_down.json"),
}


def anchor_of(key: str) -> Anchor:
    """The anchor figures of a shape of SHAPES: SGLang's best path per M (TMA where faster),
    unfused, bf16."""
    name, E, topk, K, N, _, _ = SHAPES[key]
    anchor = find_anchor(E, N, K, topk, "bf16", ANCHOR_DEVICE, packaged_baselines()[BASELINE])
    if anchor is None:
        raise ValueError(f"no anchor figures for {name} (E={E},N={N},K={K},topk={topk}) in the packaged {BASELINE}")
    return anchor


def load_configs(name: str) -> dict[int, dict]:
    return read_foreign_configs(packaged_baselines()[BASELINE] / name).configs


def check_shape(name: str, topk: int, table1: dict, table2: dict, w1: torch.Tensor, w2: torch.Tensor,
                check_m: list[int], dtypes=CHECK_DTYPES) -> list[dict]:
    """Both variants vs the float64 reference, per dtype and M, a fresh routing per check."""
    checks = []
    for dtype in dtypes:
        v1, v2 = (w1, w2) if dtype == w1.dtype else (w1.to(dtype), w2.to(dtype))
        for M in check_m:
            case = LayerCase.random(v1, v2, M, topk, seed=M + 7)
            gemm1, gemm2 = nearest(table1, M), nearest(table2, M)
            for variant in ("unfused", "fused"):
                checked = check(case, case.layer(variant, gemm1, gemm2))
                checks.append({"shape": name, "dtype": str(dtype), "M": M, "variant": variant,
                               "rel_error": checked.error, "ok": checked.ok})
                print(f"check {name:16s} {str(dtype):15s} M={M:<6d} {variant:8s} rel err {checked.error:.2e} "
                      f"{'ok' if checked.ok else 'FAIL'}", flush=True)
    return checks


def all_switch_sets() -> list[Switches]:
    """Every combination of the switches that the kernels accept (split-K 1 and 2)."""
    sets = []
    for sorted_rows, fuse, tma_w, tma_a, split_k, persistent in itertools.product(
            (False, True), (False, True), (False, True), (False, True), (1, 2), (False, True)):
        try:
            sets.append(Switches(sorted_rows=sorted_rows, fuse_activation=fuse, tma_weights=tma_w,
                                 tma_activations=tma_a, split_k=split_k, persistent=persistent))
        except SwitchError:
            continue
    return sets


def fitted(switches: Switches, gemm1: LaunchConfig, gemm2: LaunchConfig) -> tuple[LaunchConfig, LaunchConfig]:
    """The configs a switch set can run: GEMM 2 on GEMM 1's BLOCK_SIZE_M for sorted rows, GEMM 1
    with as few stages as two weight tiles need to fit in this device's shared memory."""
    if switches.sorted_rows:
        gemm2 = gemm2.replace(block_m=gemm1.block_m)
    shared_memory = local_device().shared_memory_bytes
    while (gemm1.fit_problem(2, shared_memory, weight_tiles=switches.weight_tiles) is not None
           and gemm1.num_stages > 1):
        gemm1 = gemm1.replace(num_stages=gemm1.num_stages - 1)
    return gemm1, gemm2


def check_switches(name: str, topk: int, table1: dict, table2: dict, w1: torch.Tensor, w2: torch.Tensor,
                   switch_m: list[int], switch_sets: list[Switches] | None = None) -> list[dict]:
    """Every switch set (or those given) and variant vs the float64 reference at each M, one
    config pair."""
    gemm1 = LaunchConfig.from_json(nearest(table1, max(switch_m)))
    gemm2 = LaunchConfig.from_json(nearest(table2, max(switch_m)))
    cases = {M: LayerCase.random(w1, w2, M, topk, seed=M + 11) for M in switch_m}
    checks = []
    for switches in switch_sets or all_switch_sets():
        config1, config2 = fitted(switches, gemm1, gemm2)
        label = ",".join(f"{name}={value}" for name, value in switches.to_json().items()) or "off"
        for M, case in cases.items():
            for variant in ("unfused", "fused"):
                try:
                    checked = check(case, case.layer(variant, config1, config2, switches=switches))
                    error, ok = checked.error, checked.ok
                except Exception as failure:  # noqa: BLE001 - a switch set that cannot build or launch fails
                    error, ok = float("inf"), False
                    print(f"switches {label}: {type(failure).__name__}: {str(failure).splitlines()[0][:200]}")
                checks.append({"shape": name, "dtype": "torch.bfloat16", "M": M, "variant": variant,
                               "switches": label, "rel_error": error, "ok": ok})
                print(f"switch {name:16s} M={M:<6d} {variant:8s} {label:60s} rel err {error:.2e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    return checks


def time_shape(name: str, N: int, K: int, topk: int, table1: dict, table2: dict, w1: torch.Tensor,
               w2: torch.Tensor, anchors: list[tuple[int, float]]) -> list[dict]:
    """Per (M, anchor µs): unfused, fused (relaxed atomics, and acq_rel for M >= 1024) with the
    shipped configs, one after another on the same inputs and alignment."""
    rows = []
    for M, anchor_us in anchors:
        case = LayerCase.random(w1, w2, M, topk, seed=M)
        gemm1, gemm2 = nearest(table1, M), nearest(table2, M)
        tuned = get_config(w1.shape[0], N, K, topk, w1.dtype, M)
        runs = [case.layer("unfused", gemm1, gemm2), case.layer("fused", gemm1, gemm2),
                case.layer(tuned.variant, tuned.gemm1, tuned.gemm2, switches=tuned.switches)]
        if M >= 1024:
            runs.append(case.layer("fused", gemm1, gemm2, atomic_sem="acq_rel"))
        unfused, fused, tuned_us, *acq_rel = [timing.median_us for timing in time_interleaved(runs)]
        floor = roofline_floor_us(M, N, K, topk, case.experts_hit)
        rows.append({"shape": name, "M": M, "unfused_us": unfused, "fused_us": fused,
                     "fused_acq_rel_us": acq_rel[0] if acq_rel else None, "tuned_us": tuned_us,
                     "tuned_source": tuned.source, "tuned_switches": tuned.switches.to_json(), "floor_us": floor,
                     "anchor_unfused_us": anchor_us, "gemm1": gemm1, "gemm2": gemm2})
        print(f"time  {name:16s} M={M:<6d} unfused {unfused:8.1f} fused {fused:8.1f} "
              f"tuned {tuned_us:8.1f} floor {floor:8.1f} anchor {anchor_us:8.1f}", flush=True)
    return rows


def summary_text(rows: list[dict], checks: list[dict]) -> str:
    """The table printed last."""
    lines = [f"{'shape':16s} {'M':>6s} {'unfused':>9s} {'fused':>9s} {'acq_rel':>9s} {'f/u':>6s} {'floor':>8s} "
             f"{'u/floor':>7s} {'anchor':>8s} {'u/anchor':>8s} {'tuned':>9s} {'t/floor':>7s} {'t/anchor':>8s}"]
    for r in rows:
        acq = f"{r['fused_acq_rel_us']:9.1f}" if r["fused_acq_rel_us"] else f"{'-':>9s}"
        lines.append(f"{r['shape']:16s} {r['M']:6d} {r['unfused_us']:9.1f} {r['fused_us']:9.1f} {acq} "
                     f"{r['unfused_us'] / r['fused_us']:6.3f} {r['floor_us']:8.1f} "
                     f"{r['unfused_us'] / r['floor_us']:7.2f} {r['anchor_unfused_us']:8.1f} "
                     f"{r['unfused_us'] / r['anchor_unfused_us']:8.3f} {r['tuned_us']:9.1f} "
                     f"{r['tuned_us'] / r['floor_us']:7.2f} {r['tuned_us'] / r['anchor_unfused_us']:8.3f}")
    switch_checks = [check for check in checks if "switches" in check]
    if switch_checks:
        sets = {check["switches"] for check in switch_checks}
        failed = sorted({check["switches"] for check in switch_checks if not check["ok"]})
        lines.append(f"switches: {len(sets)} sets x variants x M, {sum(c['ok'] for c in switch_checks)}/"
                     f"{len(switch_checks)} within tolerance" + (f"; failed: {'; '.join(failed)}" if failed else ""))
    passed = sum(check["ok"] for check in checks)
    lines.append(f"correctness: {passed}/{len(checks)} within tolerance "
                 f"(bf16 {TOLERANCE[torch.bfloat16]:.0e}, fp16 {TOLERANCE[torch.float16]:.0e})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--shapes", default="qwen3,qwen2,deepseek")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)))
    parser.add_argument("--check-m", default="64,1024", help="batch sizes of the correctness check")
    parser.add_argument("--switch-shapes", default="qwen3", help="shapes whose every switch set is checked "
                        "('' for none)")
    parser.add_argument("--switch-m", default="3,1024", help="batch sizes of the switch check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)  # fails now, not after the measurements
    m_values = [int(v) for v in args.m.split(",")]
    check_m = [int(v) for v in args.check_m.split(",")]
    device = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}", flush=True)
    shape_keys = args.shapes.split(",")
    # Every shape's anchor figures first: a missing one fails before any measurement.
    anchor_times = {key: anchor_of(key).times_us for key in shape_keys}
    rows, checks = [], []
    for key in shape_keys:
        name, E, topk, K, N, file1, file2 = SHAPES[key]
        table1 = load_configs(file1)
        table2 = load_configs(file2) if file2 else table1
        w1, w2 = make_weights(E, N, K, torch.bfloat16, device, torch.Generator(device=device).manual_seed(0))
        checks += check_shape(name, topk, table1, table2, w1, w2, check_m)
        if key in args.switch_shapes.split(","):
            checks += check_switches(name, topk, table1, table2, w1, w2, [int(v) for v in args.switch_m.split(",")])
        anchors = [(M, anchor_us) for M, anchor_us in anchor_times[key].items() if M in m_values]
        rows += time_shape(name, N, K, topk, table1, table2, w1, w2, anchors)
        del w1, w2
        torch.cuda.empty_cache()

    write_atomic(out_dir / "check_gpu.json", json.dumps({"checks": checks, "timings": rows}, indent=1))
    print()
    print(summary_text(rows, checks), end="")
    return 0 if all(check["ok"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
