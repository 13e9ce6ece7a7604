"""Search quality: the tuner's winner of each role vs an exhaustive sweep of the same space.

For each batch size and role, every config the pruning rules keep is compiled (ahead, in
worker processes, as the tuner does), checked against the float64 reference and timed with
the tuner's own timing. The sweep's best and the table's winner are then timed against each
other in interleaved rounds (a single timing of a large layer can be off by several percent,
so the sweep's own figures, one timing each, decide only which config is best). Prints, per
(M, role): candidates, the two configs' medians and their ratio, and where the table's winner
ranked in the sweep.

    python scripts/search_quality.py --table tuned_configs/NVIDIA_H200/E=128,N=768,K=2048,topk=8,dtype=bf16.json \
        --m 16,256,4096 [--space space.yaml] [--out out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moetune.bench import interleaved_times, make_weights
from moetune.device import local_device, torch_device
from moetune.tables import TORCH_DTYPES, read_table, write_atomic
from moetune.tune import Compiler, compiler_for
from moetune.tune.compile_pool import COMPILE_TIMEOUT_S
from moetune.tune.inputs import BatchBench
from moetune.tune.space import Problem, candidates, load_space
from moetune.types import LaunchConfig, Role, Variant


def sweep(bench: BatchBench, role: Role, configs: list[LaunchConfig], compiler: Compiler) -> list[tuple]:
    """(µs, config) of every config that compiles, runs, passes the check and gets a precise
    time (the tuner's cutoff), fastest first."""
    futures = [compiler.submit(bench.compile_request(role, c.block_m), c) for c in configs]
    measured = []
    for config, future in zip(configs, futures):
        try:
            if future is not None:
                future.result(timeout=COMPILE_TIMEOUT_S)
            _, value, precise = bench.check_and_time_role(role, config, [t for t, _ in measured])
        except Exception:  # noqa: BLE001 - a config that fails to compile or launch is out
            continue
        if value is not None and precise:
            measured.append((value, config))
    return sorted(measured, key=lambda item: item[0])


def role_medians(bench: BatchBench, role: Role, configs: list[LaunchConfig], rounds: int) -> list[float]:
    """Median µs of each config in one role, timed in interleaved rounds."""
    timings = [lambda config=config: bench.time_role(role, config)[0] for config in configs]
    return [statistics.median(t) for t in interleaved_times(timings, rounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="a table written by moetune run")
    parser.add_argument("--m", default="16,256,4096", help="batch sizes (must be in the table), in this order")
    parser.add_argument("--roles", default=",".join(role.value for role in Role),
                        help="roles to sweep (one process per role spreads a sweep over GPUs)")
    parser.add_argument("--space", default=None, help="search space YAML (default: moetune's)")
    parser.add_argument("--compile-workers", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds timing the best against the tuned")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    names = [name.strip() for name in args.roles.split(",")]
    bad = [name for name in names if name not in {role.value for role in Role}]
    if bad:
        parser.error(f"--roles: unknown {', '.join(bad)}; use {', '.join(role.value for role in Role)}")
    roles = [Role(name) for name in names]
    table = read_table(args.table)
    shape, dtype = table["shape"], table["shape"]["dtype"]
    E, N, K, topk = shape["E"], shape["N"], shape["K"], shape["topk"]
    device = local_device()
    space = load_space(args.space)
    generator = torch.Generator(device=torch_device()).manual_seed(0)
    w1, w2 = make_weights(E, N, K, TORCH_DTYPES[dtype], torch_device(), generator)
    compiler = compiler_for(args.compile_workers, device.is_gpu)
    compiler.capability = device.compute_capability
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for M in (int(m) for m in args.m.split(",")):
            entry = table["batch_sizes"][M]
            bench = BatchBench(w1, w2, M, topk, seed=M)
            for role in roles:
                variant, gemm = (role.variant or Variant.UNFUSED).value, role.gemm.value
                if variant not in entry:
                    continue
                problem = Problem.for_gemm(role.gemm, M, E, N, K, topk, w1.element_size())
                configs = candidates(space, problem, device.shared_memory_bytes)
                start = time.monotonic()
                ranked = sweep(bench, role, configs, compiler)
                tuned = LaunchConfig.from_json(entry[variant][gemm])
                best = ranked[0][1]
                rank = next((i + 1 for i, (_, c) in enumerate(ranked) if c == tuned), None)
                # When the search found the sweep's best there is nothing to time it against.
                medians = role_medians(bench, role, [best] if tuned == best else [best, tuned], args.rounds)
                best_us, tuned_us = medians[0], medians[-1]
                row = {"M": M, "role": role.value, "candidates": len(configs), "measured": len(ranked),
                       "sweep_best_us": best_us, "sweep_best": best.to_json(), "tuned_us": tuned_us,
                       "tuned": tuned.to_json(),
                       "tuned_over_best": tuned_us / best_us, "tuned_rank_in_sweep": rank,
                       "seconds": time.monotonic() - start,
                       # Every config's single timing, fastest first: scores any other table later.
                       "sweep": [[round(us, 2), config.to_json()] for us, config in ranked]}
                rows.append(row)
                print(f"M={M:<6d} {role.value:14s} {len(configs):5d} candidates  sweep best {best_us:9.1f} us  "
                      f"tuned {tuned_us:9.1f} us  tuned/best {tuned_us / best_us:6.3f}  "
                      f"tuned ranked {rank or '-'} in the sweep  ({row['seconds']:.0f} s)", flush=True)
                # After every row: a sweep stopped by a time limit keeps what it measured.
                write_atomic(out / "search_quality.json", json.dumps(rows, indent=1))
    finally:
        compiler.close()
    if not device.is_gpu:
        print("note: interpreter timings on the CPU mean nothing about speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
