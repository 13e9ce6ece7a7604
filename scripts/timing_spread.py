"""How much does the layer time move between alignments of the same routing?

The alignment kernel places the slots of one expert in atomic arrival order, which differs
from run to run. This times the same layer, same inputs and config, over several fresh
alignments, once as aligned and once with each expert's slots sorted ascending, to see
whether row order inside an expert explains run-to-run spread.

    python scripts/timing_spread.py --table PATH [--m 1024,3072,4096,16384] [--reps 5] [--out out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from moetune.bench import cuda_graph_time_us, make_layer_inputs, make_weights
from moetune.kernels.align import AlignedTokens
from moetune.layer import align_for, run_aligned
from moetune.tables import TORCH_DTYPES, read_table, write_atomic


def sort_within_experts(aligned: AlignedTokens, numel: int) -> AlignedTokens:
    """Same blocks, each expert's slots in ascending order (padding stays last)."""
    bm = aligned.block_size_m
    rows = aligned.sorted_ids.numel()
    owner = aligned.expert_ids.repeat_interleave(bm)[:rows].long()
    owner = torch.where(owner < 0, torch.full_like(owner, 1 << 20), owner)
    key = owner * (numel + 1) + aligned.sorted_ids.long()
    ordered = torch.sort(key).values % (numel + 1)
    return AlignedTokens(ordered.to(torch.int32), aligned.expert_ids, aligned.padded_rows, bm)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", required=True)
    parser.add_argument("--m", default="1024,3072,4096,16384")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="out", help="folder for timing_spread.json")
    args = parser.parse_args()
    table = read_table(args.table)
    shape = table["shape"]
    E, N, K, topk = shape["E"], shape["N"], shape["K"], shape["topk"]
    w1, w2 = make_weights(E, N, K, TORCH_DTYPES[shape["dtype"]], "cuda", torch.Generator("cuda").manual_seed(0))
    results = []
    for M in map(int, args.m.split(",")):
        inputs = make_layer_inputs(M, w1, w2, topk, seed=M)
        out = torch.empty_like(inputs.x)
        for variant in ("unfused", "fused"):
            entry = table["batch_sizes"][M][variant]
            g1, g2 = entry["gemm1"], entry["gemm2"]
            for order in ("arrival", "sorted"):
                times = []
                for _ in range(args.reps):
                    a1, a2 = align_for(inputs.topk_ids, E, g1, g2)
                    if order == "sorted":
                        a1 = sort_within_experts(a1, M * topk)
                        a2 = a1 if a2.block_size_m == a1.block_size_m else sort_within_experts(a2, M * topk)
                    times.append(cuda_graph_time_us(lambda: run_aligned(
                        inputs.x, w1, w2, inputs.topk_weights, inputs.topk_ids, a1, a2, g1, g2,
                        variant=variant, out=out)))
                row = {"M": M, "variant": variant, "order": order, "times_us": times}
                results.append(row)
                print(f"M={M:<6d} {variant:8s} {order:8s} min {min(times):8.1f} median "
                      f"{statistics.median(times):8.1f} max {max(times):8.1f}", flush=True)
    write_atomic(Path(args.out) / "timing_spread.json", json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
