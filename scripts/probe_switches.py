"""Each kernel switch on the GPU: correct against float64, and its time beside all-off.

The launch configs are the packaged tuned table's (Qwen3-30B-A3B) or the shipped anchor's
(DeepSeek-V3 at TP4), tuned for the all-off kernel, so a switch that needs other tiles
shows here as slower than it can be: this is a first look, not the ablation (that one
re-tunes with each switch off). Alignment is outside the timed region; CUDA graph of 5
calls, median of 10 replays.

    python scripts/probe_switches.py [--shapes qwen3,deepseek] [--m 1,64,1024,4096,16384]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moetune.bench import cuda_graph_time_us, make_layer_inputs, make_weights, roofline_floor_us
from moetune.kernels import KernelSwitches, align_tokens, run_experts
from moetune.reference import TOLERANCE, moe_reference, relative_error

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name -> (E, topk, K, N, tuned table or (GEMM 1 file, GEMM 2 file) of the anchor)
    "qwen3": (128, 8, 2048, 768, ROOT / "tuned_configs/NVIDIA_H200/E=128,N=768,K=2048,topk=8,dtype=bf16.json"),
    "deepseek": (256, 8, 7168, 512, (ROOT / "moetune/baselines/sglang-vllm-h200/E=256,N=512,device_name=NVIDIA_H200.json",
                                     ROOT / "moetune/baselines/sglang-vllm-h200/E=256,N=512,device_name=NVIDIA_H200_down.json")),
}
SWITCHES = {
    "off": KernelSwitches(),
    "sorted": KernelSwitches(sorted_rows=True),
    "sorted+tma_a": KernelSwitches(sorted_rows=True, tma_activations=True),
    "sorted+tma": KernelSwitches(sorted_rows=True, tma_activations=True, tma_weights=True),
    "tma_w": KernelSwitches(tma_weights=True),
    "silu": KernelSwitches(fuse_activation=True),
    "silu+sorted": KernelSwitches(fuse_activation=True, sorted_rows=True),
    "silu+sorted+tma": KernelSwitches(fuse_activation=True, sorted_rows=True, tma_activations=True, tma_weights=True),
    "persistent": KernelSwitches(persistent=True),
    "persist+sorted+tma": KernelSwitches(persistent=True, sorted_rows=True, tma_activations=True, tma_weights=True),
    "split_k2": KernelSwitches(split_k=2),
    "split_k4": KernelSwitches(split_k=4),
}
SMALL_M_ONLY = {"split_k2", "split_k4"}
KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def nearest(table: dict[int, dict], M: int) -> dict:
    key = min(table, key=lambda m: (abs(m - M), m))
    return {k: table[key][k] for k in KEYS}


def configs_for(source, M: int, variant: str) -> tuple[dict, dict]:
    if isinstance(source, tuple):
        up = {int(k): v for k, v in json.loads(source[0].read_text()).items()}
        down = {int(k): v for k, v in json.loads(source[1].read_text()).items()}
        return nearest(up, M), nearest(down, M)
    entries = {int(k): v for k, v in json.loads(source.read_text())["batch_sizes"].items()}
    entry = entries[min(entries, key=lambda m: (abs(m - M), m))]
    chosen = entry[variant] if variant in entry else entry[entry["winner"]]
    return dict(chosen["gemm1"]), dict(chosen["gemm2"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen3,deepseek")
    parser.add_argument("--m", default="1,64,1024,4096,16384")
    parser.add_argument("--out", default="out")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new batch size after this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("probe_switches.py needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    device = torch.device("cuda")
    rows, failures = [], []
    for key in args.shapes.split(","):
        E, topk, K, N, source = SHAPES[key]
        generator = torch.Generator(device=device).manual_seed(0)
        w1, w2 = make_weights(E, N, K, torch.bfloat16, device, generator)
        for M in [int(v) for v in args.m.split(",")]:
            if time.monotonic() - started > args.budget_s:
                print(f"budget spent: skipping {key} M={M}", flush=True)
                continue
            inputs = make_layer_inputs(M, w1, w2, topk, seed=M)
            reference = moe_reference(inputs.x, w1, w2, inputs.topk_weights, inputs.topk_ids)
            floor = roofline_floor_us(M, N, K, topk, inputs.experts_hit)
            for variant in ("unfused", "fused"):
                gemm1, gemm2 = configs_for(source, M, variant)
                out = torch.empty_like(inputs.x)
                base = None
                for name, switches in SWITCHES.items():
                    if name in SMALL_M_ONLY and M > 64:
                        continue
                    g2 = dict(gemm2, BLOCK_SIZE_M=gemm1["BLOCK_SIZE_M"]) if switches.sorted_rows else gemm2
                    a1 = align_tokens(inputs.topk_ids, E, gemm1["BLOCK_SIZE_M"])
                    a2 = a1 if g2["BLOCK_SIZE_M"] == gemm1["BLOCK_SIZE_M"] else \
                        align_tokens(inputs.topk_ids, E, g2["BLOCK_SIZE_M"])

                    def layer():
                        return run_experts(inputs.x, w1, w2, inputs.topk_weights, inputs.topk_ids, a1, a2, gemm1,
                                           g2, switches, atomic_add=variant == "fused", out=out)
                    try:
                        out.fill_(float("nan"))
                        error = relative_error(layer(), reference)
                        if not error <= TOLERANCE[torch.bfloat16]:
                            failures.append((key, M, variant, name, error))
                            print(f"FAIL {key} M={M} {variant} {name}: rel err {error:.2e}", flush=True)
                            continue
                        us = cuda_graph_time_us(layer, calls_per_graph=5, replays=10)
                    except Exception as exc:  # noqa: BLE001 - a switch that cannot run is reported, not fatal
                        failures.append((key, M, variant, name, repr(exc)[:200]))
                        print(f"ERROR {key} M={M} {variant} {name}: {exc!r}"[:300], flush=True)
                        continue
                    base = us if name == "off" else base
                    rows.append({"shape": key, "M": M, "variant": variant, "switches": name, "us": us,
                                 "vs_off": us / base if base else None, "floor_us": floor, "rel_error": error})
                    print(f"{key:9s} M={M:<6d} {variant:8s} {name:20s} {us:9.1f} us  x{us / base:5.3f} vs off  "
                          f"err {error:.1e}", flush=True)
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "probe_switches.json").write_text(json.dumps({"rows": rows, "failures": failures}, indent=1))
    print("\nbest switch set per shape, M and variant (time, ratio to all-off, ratio to the roofline floor)")
    best: dict[tuple, dict] = {}
    for row in rows:
        slot = (row["shape"], row["M"], row["variant"])
        if slot not in best or row["us"] < best[slot]["us"]:
            best[slot] = row
    for (shape, M, variant), row in sorted(best.items()):
        print(f"{shape:9s} {M:6d} {variant:8s} {row['switches']:20s} {row['us']:9.1f} x{row['vs_off']:.3f} "
              f"floor x{row['us'] / row['floor_us']:.2f}")
    print(f"checks failed or errored: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
