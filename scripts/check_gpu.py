"""Correctness and speed of the MoE layer on a GPU with the anchor's shipped configs.

1. Both variants vs the float64 reference, bf16 and fp16, for the anchor shapes.
2. Per shape and M: unfused µs, fused µs (relaxed atomics, and acq_rel for M >= 1024),
   the ratio to the roofline floor, and the anchor's figure (SGLang's kernel with the same
   configs, measured on an H200) beside them.
Timing: 10 layer calls per CUDA graph, median of 20 replays, routing and alignment outside.

    python scripts/check_gpu.py [--out DIR] [--shapes qwen3,qwen2,deepseek] [--m 1,4,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moetune.bench import cuda_graph_time_us, make_layer_inputs, make_weights, roofline_floor_us
from moetune.export import nearest, read_foreign_configs
from moetune.layer import align_for, run_aligned
from moetune.reference import TOLERANCE, moe_reference, relative_error

CONFIG_DIR = Path(__file__).parent / "anchor_configs"
M_VALUES = [1, 4, 16, 64, 256, 1024, 4096, 16384]

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
    return read_foreign_configs(CONFIG_DIR / name).configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--shapes", default="qwen3,qwen2,deepseek")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)))
    parser.add_argument("--check-m", default="64,1024", help="batch sizes of the correctness check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    m_values = [int(v) for v in args.m.split(",")]
    device = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}", flush=True)
    rows, checks, failures = [], [], 0

    for key in args.shapes.split(","):
        name, E, topk, K, N, file1, file2, anchor = SHAPES[key]
        table1 = load_configs(file1)
        table2 = load_configs(file2) if file2 else table1
        generator = torch.Generator(device=device).manual_seed(0)
        w1, w2 = make_weights(E, N, K, torch.bfloat16, device, generator)

        # 1. correctness, both variants, bf16 and fp16, fresh routing per check
        for dtype in (torch.bfloat16, torch.float16):
            v1, v2 = (w1, w2) if dtype == torch.bfloat16 else (w1.to(dtype), w2.to(dtype))
            for M in [int(v) for v in args.check_m.split(",")]:
                inputs = make_layer_inputs(M, v1, v2, topk, seed=M + 7)
                reference = moe_reference(inputs.x, v1, v2, inputs.topk_weights, inputs.topk_ids)
                gemm1, gemm2 = nearest(table1, M), nearest(table2, M)
                a1, a2 = align_for(inputs.topk_ids, E, gemm1, gemm2)
                for variant in ("unfused", "fused"):
                    out = torch.full_like(inputs.x, float("nan"))
                    run_aligned(inputs.x, v1, v2, inputs.topk_weights, inputs.topk_ids, a1, a2, gemm1, gemm2,
                                variant=variant, out=out)
                    error = relative_error(out, reference)
                    ok = error <= TOLERANCE[dtype]
                    failures += not ok
                    checks.append({"shape": name, "dtype": str(dtype), "M": M, "variant": variant, "rel_error": error,
                                   "ok": ok})
                    print(f"check {name:16s} {str(dtype):15s} M={M:<6d} {variant:8s} rel err {error:.2e} "
                          f"{'ok' if ok else 'FAIL'}", flush=True)
            del v1, v2

        # 2. timing with the shipped configs
        for M, anchor_us in zip(M_VALUES, anchor):
            if M not in m_values:
                continue
            inputs = make_layer_inputs(M, w1, w2, topk, seed=M)
            gemm1, gemm2 = nearest(table1, M), nearest(table2, M)
            a1, a2 = align_for(inputs.topk_ids, E, gemm1, gemm2)
            out = torch.empty_like(inputs.x)

            def layer(variant, sem="relaxed"):
                return lambda: run_aligned(inputs.x, w1, w2, inputs.topk_weights, inputs.topk_ids, a1, a2,
                                           gemm1, gemm2, variant=variant, out=out, atomic_sem=sem)

            unfused = cuda_graph_time_us(layer("unfused"))
            fused = cuda_graph_time_us(layer("fused"))
            acq_rel = cuda_graph_time_us(layer("fused", "acq_rel")) if M >= 1024 else None
            floor = roofline_floor_us(M, N, K, topk, inputs.experts_hit)
            rows.append({"shape": name, "M": M, "unfused_us": unfused, "fused_us": fused, "fused_acq_rel_us": acq_rel,
                         "floor_us": floor, "anchor_unfused_us": anchor_us, "gemm1": gemm1, "gemm2": gemm2})
            print(f"time  {name:16s} M={M:<6d} unfused {unfused:8.1f} fused {fused:8.1f} "
                  f"floor {floor:8.1f} anchor {anchor_us:8.1f}", flush=True)
        del w1, w2
        torch.cuda.empty_cache()

    (out_dir / "check_gpu.json").write_text(json.dumps({"checks": checks, "timings": rows}, indent=1))
    print()
    print(f"{'shape':16s} {'M':>6s} {'unfused':>9s} {'fused':>9s} {'acq_rel':>9s} {'f/u':>6s} {'floor':>8s} "
          f"{'u/floor':>7s} {'anchor':>8s} {'u/anchor':>8s}")
    for r in rows:
        acq = f"{r['fused_acq_rel_us']:9.1f}" if r["fused_acq_rel_us"] else f"{'-':>9s}"
        print(f"{r['shape']:16s} {r['M']:6d} {r['unfused_us']:9.1f} {r['fused_us']:9.1f} {acq} "
              f"{r['unfused_us'] / r['fused_us']:6.3f} {r['floor_us']:8.1f} {r['unfused_us'] / r['floor_us']:7.2f} "
              f"{r['anchor_unfused_us']:8.1f} {r['unfused_us'] / r['anchor_unfused_us']:8.3f}")
    print(f"correctness: {len(checks) - failures}/{len(checks)} within tolerance "
          f"(bf16 {TOLERANCE[torch.bfloat16]:.0e}, fp16 {TOLERANCE[torch.float16]:.0e})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
