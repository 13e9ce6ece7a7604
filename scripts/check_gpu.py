"""Correctness and speed of the MoE layer on a GPU with the anchor's shipped configs.

1. Both variants vs the float64 reference, bf16 and fp16, for the anchor shapes.
2. Per shape and M: unfused µs, fused µs (relaxed atomics, and acq_rel for M >= 1024),
   the ratio to the roofline floor, and the anchor's figure (SGLang's kernel with the same
   configs, measured on an H200) beside them.
Timing (moetune.measure): 10 layer calls per CUDA graph, median of 20 replays, routing and
alignment outside.

    python scripts/check_gpu.py [--out DIR] [--shapes qwen3,qwen2,deepseek] [--m 1,4,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moetune.bench import make_weights, roofline_floor_us
from moetune.export import nearest, packaged_baselines, read_foreign_configs
from moetune.measure import LayerCase, check, time_interleaved
from moetune.reference import TOLERANCE
from moetune.tables import write_atomic

BASELINE = "sglang-vllm-h200"  # the anchor's configs, packaged with moetune
M_VALUES = [1, 4, 16, 64, 256, 1024, 4096, 16384]
CHECK_DTYPES = (torch.bfloat16, torch.float16)

# name -> (E, topk, K = hidden, N = intermediate, GEMM 1 file, GEMM 2 file or None,
#          anchor unfused µs per M from SGLang's kernel with these configs, H200)
SHAPES = {
    "qwen3": ("Qwen3-30B-A3B", 128, 8, 2048, 768, "E=128,N=768,device_name=NVIDIA_H200.json", None,
              [29.3, 75.1, 187, 291, 317, 372, 857, 2895]),
    "qwen2": ("Qwen2-57B-A14B", 64, 8, 3584, 2560, "E=64,N=2560,device_name=NVIDIA_H200.json", None,
              [117, 364, 700, 809, 853, 1308, 4017, 14285]),
    "deepseek": ("DeepSeek-V3-TP4", 256, 8, 7168, 512, "E=256,N=512,device_name=NVIDIA_H200.json",
                 "E=256,N=512,device_name=NVIDIA_H200_down.json",
                 [112, 183, 514, 1120, 1289, 1403, 2747, 8814]),
}


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


def time_shape(name: str, N: int, K: int, topk: int, table1: dict, table2: dict, w1: torch.Tensor,
               w2: torch.Tensor, anchors: list[tuple[int, float]]) -> list[dict]:
    """Per (M, anchor µs): unfused, fused (relaxed atomics, and acq_rel for M >= 1024) with the
    shipped configs, one after another on the same inputs and alignment."""
    rows = []
    for M, anchor_us in anchors:
        case = LayerCase.random(w1, w2, M, topk, seed=M)
        gemm1, gemm2 = nearest(table1, M), nearest(table2, M)
        runs = [case.layer("unfused", gemm1, gemm2), case.layer("fused", gemm1, gemm2)]
        if M >= 1024:
            runs.append(case.layer("fused", gemm1, gemm2, atomic_sem="acq_rel"))
        unfused, fused, *acq_rel = [timing.median_us for timing in time_interleaved(runs)]
        floor = roofline_floor_us(M, N, K, topk, case.experts_hit)
        rows.append({"shape": name, "M": M, "unfused_us": unfused, "fused_us": fused,
                     "fused_acq_rel_us": acq_rel[0] if acq_rel else None, "floor_us": floor,
                     "anchor_unfused_us": anchor_us, "gemm1": gemm1, "gemm2": gemm2})
        print(f"time  {name:16s} M={M:<6d} unfused {unfused:8.1f} fused {fused:8.1f} "
              f"floor {floor:8.1f} anchor {anchor_us:8.1f}", flush=True)
    return rows


def summary_text(rows: list[dict], checks: list[dict]) -> str:
    """The table printed last."""
    lines = [f"{'shape':16s} {'M':>6s} {'unfused':>9s} {'fused':>9s} {'acq_rel':>9s} {'f/u':>6s} {'floor':>8s} "
             f"{'u/floor':>7s} {'anchor':>8s} {'u/anchor':>8s}"]
    for r in rows:
        acq = f"{r['fused_acq_rel_us']:9.1f}" if r["fused_acq_rel_us"] else f"{'-':>9s}"
        lines.append(f"{r['shape']:16s} {r['M']:6d} {r['unfused_us']:9.1f} {r['fused_us']:9.1f} {acq} "
                     f"{r['unfused_us'] / r['fused_us']:6.3f} {r['floor_us']:8.1f} "
                     f"{r['unfused_us'] / r['floor_us']:7.2f} {r['anchor_unfused_us']:8.1f} "
                     f"{r['unfused_us'] / r['anchor_unfused_us']:8.3f}")
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
    rows, checks = [], []
    for key in args.shapes.split(","):
        name, E, topk, K, N, file1, file2, anchor = SHAPES[key]
        table1 = load_configs(file1)
        table2 = load_configs(file2) if file2 else table1
        w1, w2 = make_weights(E, N, K, torch.bfloat16, device, torch.Generator(device=device).manual_seed(0))
        checks += check_shape(name, topk, table1, table2, w1, w2, check_m)
        anchors = [(M, anchor_us) for M, anchor_us in zip(M_VALUES, anchor) if M in m_values]
        rows += time_shape(name, N, K, topk, table1, table2, w1, w2, anchors)
        del w1, w2
        torch.cuda.empty_cache()

    write_atomic(out_dir / "check_gpu.json", json.dumps({"checks": checks, "timings": rows}, indent=1))
    print()
    print(summary_text(rows, checks), end="")
    return 0 if all(check["ok"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
