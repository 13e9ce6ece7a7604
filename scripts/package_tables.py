"""Regenerate every packaged H200 table: one `moetune run` per built-in preset, at the
tensor-parallel size an H200 deployment uses, into tuned_configs/NVIDIA_H200/.

The TP size is the smallest of 1, 2, 4, 8 at which a rank's share of the MoE weights in bf16
fits the H200's 141 GB (an FP8 release at its bf16 model's size, as the fp8 tables are
packaged), DeepSeek-V3 at 8 (its H200 deployments run at TP 8; in bf16 its experts alone need
1.3 TB, which no TP size of one node fits). The weights are approximated by the MoE layers:

    bytes = num_layers x E x 3 x N x K x 2      (w1 holds 2N x K per expert, w2 K x N; bf16)

attention, dense layers, embeddings and the KV cache are left out, so the TP size is a lower
bound of what a deployment needs for those too.

    python scripts/package_tables.py [--dry-run] [-- extra moetune run arguments, e.g. --devices 0,1,2,3]

Run from the repository root on an H200 host. Each run resumes where a killed one stopped
(the studies live in tuned_configs/NVIDIA_H200/moetune-studies.journal, which git ignores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from moetune.shapes import MoEShape, load_presets

ROOT = Path(__file__).resolve().parent.parent
H200_MEMORY_BYTES = 141e9
TP_SIZES = (1, 2, 4, 8)  # one node's GPUs
FIXED_TP = {"DeepSeek-V3": 8, "DeepSeek-V3-FP8": 8}


def moe_weight_bytes(shape: MoEShape) -> int:
    return shape.num_layers * shape.E * 3 * shape.N * shape.K * 2


def deployment_tp(shape: MoEShape) -> int:
    if shape.name in FIXED_TP:
        return FIXED_TP[shape.name]
    fits = [tp for tp in TP_SIZES if moe_weight_bytes(shape) / tp <= H200_MEMORY_BYTES]
    if not fits:
        raise SystemExit(f"package_tables.py: {shape.name}'s MoE weights fit no TP size of {TP_SIZES}: "
                         f"name one in FIXED_TP")
    return fits[0]


def commands(extra: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "moetune", "run", "--gpu", "H200", "--model", name,
             "--tp-size", str(deployment_tp(shape)), "--out-dir", str(ROOT / "tuned_configs"), *extra]
            for name, shape in load_presets().items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the weights, run nothing")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more `moetune run` arguments, after --")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    for command in commands(extra):
        print(" ".join(["python3", *command[1:]]), flush=True)
        if not args.dry_run:
            result = subprocess.run(command, cwd=ROOT)
            if result.returncode != 0:
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
