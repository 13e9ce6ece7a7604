"""How many switch layers the search builds for Qwen3-30B-A3B bf16 on an H200, default batch
sizes and space, with and without the band rules: the layers planned on top of the all-off pair
(the first pass of every family), and the GEMM kernels they need that the role studies never built.
The role studies' measured configs are stood in for by the table's winners, nearest M first.
CPU only, nothing timed:

    python3 scripts/count_switch_layers.py "tuned_configs/NVIDIA_H200/E=128,N=768,K=2048,topk=8,dtype=bf16.json"
"""
import json
import math
import sys
import time

from moetune.device import HOPPER_SHARED_MEMORY_BYTES
from moetune.shapes import DEFAULT_BATCH_SIZES
from moetune.switch_candidates import LayerCandidate
from moetune.tune.space import load_space
from moetune.tune.study import RoleResult
from moetune.tune.switch_search import pair_pool, planned_layers
from moetune.tune.switch_space import LayerTarget
from moetune.types import OFF, LaunchConfig, Variant

table = json.load(open(sys.argv[1]))
E, N, K, topk = (table["shape"][k] for k in ("E", "N", "K", "topk"))
space = load_space().switches
# What each GEMM's kernel depends on besides its config (GEMM 1 is one kernel in both variants,
# GEMM 2's epilogue differs; the fused SiLU changes GEMM 1 only, TMA for activations GEMM 2 only).
GEMM1_SWITCHES = ("sorted_rows", "fuse_activation", "tma_weights", "split_k", "persistent")
GEMM2_SWITCHES = ("sorted_rows", "tma_activations", "tma_weights", "split_k", "persistent")


def kernel_switches(switches, names):
    return tuple(getattr(switches, name) for name in names)


entries = {int(M): e for M, e in table["batch_sizes"].items()}
total = {"bands off": [0, 0], "bands on": [0, 0]}
plan_s = 0.0
print(f"E={E} N={N} K={K} topk={topk}")
print(f"{'M':>6} {'rows/E':>7}  {'bands off':>9} {'bands on':>9}   families kept (layers of both variants; new GEMM kernels in brackets)")
for M in DEFAULT_BATCH_SIZES:
    row = []
    for label, capability in (("bands off", None), ("bands on", (9, 0))):
        target = LayerTarget(M, E, N, K, topk, 2, HOPPER_SHARED_MEMORY_BYTES, 132, capability)
        layers = 0
        gemm1_builds, gemm2_builds, families = set(), set(), set()
        for variant in Variant:
            # The roles' measured configs: this M's, then the other batch sizes' nearest first (24 trials).
            near = sorted(entries, key=lambda m: abs(math.log(m / M)))
            g1 = [LaunchConfig.from_json(entries[m][variant.value]["gemm1"]) for m in near]
            g2 = [LaunchConfig.from_json(entries[m][variant.value]["gemm2"]) for m in near]
            g1 = RoleResult([(float(i), c) for i, c in enumerate(dict.fromkeys(g1))][:24])
            g2 = RoleResult([(float(i), c) for i, c in enumerate(dict.fromkeys(g2))][:24])
            start = time.perf_counter()
            pool = pair_pool([(g1.ranked[0][1], g2.ranked[0][1])], g1, g2)
            plan = planned_layers(LayerCandidate(variant, OFF, *pool[0], None), space.families(), pool, target, space)
            plan_s += time.perf_counter() - start
            layers += len(plan)
            # The distinct GEMM kernels not all off: the ones the role studies never built.
            gemm1_builds |= {(l.gemm1, kernel_switches(l.switches, GEMM1_SWITCHES)) for l in plan}
            gemm2_builds |= {(variant, l.gemm2, kernel_switches(l.switches, GEMM2_SWITCHES)) for l in plan}
            families |= {"split_k" if l.switches.split_k > 1 else "fuse" if l.switches.fuse_activation else
                         "sorted" if l.switches.sorted_rows else "tma_w" if l.switches.tma_weights else "persistent"
                         for l in plan}
        kernels = len({b for b in gemm1_builds if b[-1] != kernel_switches(OFF, GEMM1_SWITCHES)}) + \
            len({b for b in gemm2_builds if b[-1] != kernel_switches(OFF, GEMM2_SWITCHES)})
        if capability:
            row.append(",".join(sorted(families)))
        total[label][0] += layers
        total[label][1] += kernels
        row.append(f"{layers:>4} [{kernels:>3}]")
    print(f"{M:>6} {M * topk / E:>7g}  {row[0]:>9} {row[1]:>9}   {row[2]}")
print("total", {k: f"{v[0]} layers, {v[1]} GEMM kernels" for k, v in total.items()})
print(f"planning (pair pool + plan) {plan_s:.2f} s for {2 * 2 * len(DEFAULT_BATCH_SIZES)} plans")
