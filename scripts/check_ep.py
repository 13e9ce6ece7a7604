"""Expert parallelism on the GPU: one rank holding half the experts against the whole layer.

Per shape and M: random tokens routed over all E experts; rank 0 holds experts [0, E/2) and
rank 1 the rest (expert_map.rank_expert_map), each through `fused_experts(..., expert_map=, global_num_experts=E)`. The
two ranks' outputs summed are checked against the float64 layer (fp8: the emulated
quantization reference), and rank 0's time is set beside the whole layer's, both with the
whole layer's configs for that M from the dispatcher (the packaged table of the dtype, block
fp8 included, or the default heuristic), so that only the experts held differ. CUDA graph of 10 calls, median of 20 replays, three
interleaved rounds; routing and the expert map are built outside the timed region.

    python scripts/check_ep.py [--shapes qwen3,deepseek-tp8] [--m 1024,4096,16384]
                               [--dtypes bf16,fp8-block] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from moetune import fused_experts, get_config, quantize_weights
from moetune.bench import make_layer_inputs, make_weights
from moetune.expert_map import rank_expert_map
from moetune.layer import Fp8Weights
from moetune.measure import LayerCase, time_interleaved
from moetune.reference import relative_error
from moetune.tables import FP8_W8A8

SHAPES = {"qwen3": (128, 8, 2048, 768), "deepseek-tp8": (256, 8, 7168, 256)}  # E, topk, K, N
BLOCK = [128, 128]


def measure(shape: str, M: int, dtype: str, device) -> dict:
    E, topk, K, N = SHAPES[shape]
    w1, w2 = make_weights(E, N, K, torch.bfloat16, device, torch.Generator(device=device).manual_seed(0))
    inputs = make_layer_inputs(M, w1, w2, topk, seed=M)
    fp8 = None
    if dtype == "fp8-block":
        (w1, w1_scale), (w2, w2_scale) = quantize_weights(w1, block_shape=BLOCK), quantize_weights(w2, block_shape=BLOCK)
        inputs, fp8 = replace(inputs, w1=w1, w2=w2), Fp8Weights(w1_scale, w2_scale, BLOCK)
    case = LayerCase(inputs, fp8)  # the float64 reference (fp8: the emulated quantization) and tolerance
    x, weights, ids = inputs.x, inputs.topk_weights, inputs.topk_ids
    selection = get_config(E, N, K, topk, FP8_W8A8 if fp8 else torch.bfloat16, M,
                           block_shape=BLOCK if fp8 else None)
    configs = {"config": selection.gemm1, "down_config": selection.gemm2, "variant": selection.variant}
    half = E // 2

    def layer(local=None, expert_map=None):
        own = slice(None) if local is None else local
        scales = {} if fp8 is None else {"w1_scale": fp8.w1_scale[own], "w2_scale": fp8.w2_scale[own],
                                         "block_shape": BLOCK}
        return lambda: fused_experts(x, w1[own], w2[own], weights, ids, expert_map=expert_map,
                                     global_num_experts=E if expert_map is not None else None,
                                     **configs, **scales)

    whole = layer()
    ranks = [layer(slice(rank * half, (rank + 1) * half), rank_expert_map(half, E, rank=rank, device=device))
             for rank in range(2)]
    reference, tolerance = case.reference, case.tolerance
    summed = ranks[0]().float() + ranks[1]().float()
    error = relative_error(summed, reference)
    whole_error = relative_error(whole(), reference)
    full, rank0 = time_interleaved([whole, ranks[0]], rounds=3)
    return {"shape": shape, "M": M, "dtype": dtype, "variant": str(selection.variant), "config_source":
            selection.source, "error_ranks_summed": error, "error_whole": whole_error, "tolerance": tolerance,
            "ok": error <= tolerance and whole_error <= tolerance, "whole_us": full.median_us,
            "rank0_us": rank0.median_us, "ratio": rank0.median_us / full.median_us}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen3,deepseek-tp8")
    parser.add_argument("--m", default="1024,4096,16384")
    parser.add_argument("--dtypes", default="bf16,fp8-block")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_ep.py times the layer on a GPU; none is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            for M in map(int, args.m.split(",")):
                row = measure(shape, M, dtype, device)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "check_ep.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| shape | dtype | M | variant | whole µs | rank 0 (half the experts) µs | ratio | error | ok |")
    print("|---|---|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['M']} | {r['variant']} | {r['whole_us']:.1f} | "
              f"{r['rank0_us']:.1f} | {r['ratio']:.3f} | {r['error_ranks_summed']:.2e} | {r['ok']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
