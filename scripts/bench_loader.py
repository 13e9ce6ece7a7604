"""Cost of loader.get_config: the price the layer pays per forward.

Prints the median over repeats of the per-call time, in microseconds, for a cached table hit,
the cached default heuristic, and a batch size the process has not seen yet (a known shape:
serving meets many M). Runs anywhere (no GPU needed): the table is a temporary one.

    python scripts/bench_loader.py [--calls 200000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import timeit
import warnings

from moetune import loader, table_paths
from moetune.device import local_device
from moetune.tables import new_table, table_path, write_table

CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}
TIMES = {"gemm1_us": 10.0, "gemm2_us": 8.0, "layer_us": 25.0}
SHAPE = dict(E=128, N=768, K=2048, topk=8)


def per_call_us(call, calls: int, repeats: int) -> float:
    call()  # the first call fills the cache
    runs = timeit.repeat(call, number=calls, repeat=repeats)
    return statistics.median(runs) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    device = local_device()
    with tempfile.TemporaryDirectory() as folder:
        table = new_table(device, **SHAPE, dtype="bf16", search={})
        table["batch_sizes"] = {
            M: {"unfused": {"gemm1": CONFIG, "gemm2": CONFIG, **TIMES}, "winner": "unfused"} for M in (1, 16, 256, 4096)
        }
        write_table(table_path(folder, device.key, **SHAPE, dtype="bf16"), table)
        os.environ[table_paths.ENV_CONFIG_DIR] = folder
        loader.clear_cache()
        warnings.simplefilter("ignore", loader.ConfigWarning)

        def table_hit():
            loader.get_config(128, 768, 2048, 8, "bf16", 300)

        def default_hit():
            loader.get_config(64, 1408, 2048, 4, "bf16", 300)

        print(f"device {device.name}; {args.calls} calls x {args.repeats} repeats, median per call")
        print(f"cached get_config, table hit:         {per_call_us(table_hit, args.calls, args.repeats):.3f} us")
        print(f"cached get_config, default heuristic: {per_call_us(default_hit, args.calls, args.repeats):.3f} us")
        new_ms = iter(range(1000, 10**9))

        def new_m():
            loader.get_config(128, 768, 2048, 8, "bf16", next(new_ms))

        calls = max(1, args.calls // 10)
        print(f"get_config, a new M of a known shape: {per_call_us(new_m, calls, args.repeats):.3f} us")


if __name__ == "__main__":
    main()
