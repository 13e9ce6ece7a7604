"""The switched grouped GEMM compiles for Hopper (sm_90) without a GPU, TMA as TMA.

The interpreter runs every switch, but it does not lower anything: this builds the binaries
a GPU would run, as the tuner's compile workers do, and checks that the descriptor loads
became bulk tensor copies (TMA) with their global scratch, and that the others did not.
"""

import os
import subprocess
import sys

COMPILE_FOR_HOPPER = """
import functools
import torch
from triton.runtime import driver
from moetune.tune.compile_pool import compile_only_driver
from moetune.kernels import compile_grouped_gemm, gemm_geometry, max_padded_rows
from moetune.kernels.grouped_gemm import GemmSwitches

driver.set_active(compile_only_driver((9, 0)))
meta = functools.partial(torch.empty, device="meta", dtype=torch.bfloat16)
M, E, N, K, topk = 64, 8, 256, 512, 2
capacity = max_padded_rows(M * topk, E, 64)
config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 4, "num_warps": 4,
          "num_stages": 3}
launches = {
    # GEMM 1, all its switches but split-K (incompatible with the fused activation)
    "gemm1": (meta(M, K), meta(E, 2 * N, K), meta(capacity, N), False,
              GemmSwitches(c_sorted=True, fuse_activation=True, tma_weights=True, persistent=True)),
    # GEMM 1 with split-K partials instead
    "gemm1_split": (meta(M, K), meta(E, 2 * N, K), meta(4, capacity, 2 * N, dtype=torch.float32), False,
                    GemmSwitches(c_sorted=True, split_k=4)),
    # GEMM 2, both epilogues, every switch it takes
    "gemm2_store": (meta(capacity, N), meta(E, K, N), meta(2, M * topk, K, dtype=torch.float32), False,
                    GemmSwitches(a_sorted=True, tma_weights=True, tma_activations=True, split_k=2, persistent=True)),
    "gemm2_atomic": (meta(capacity, N), meta(E, K, N), meta(M, K, dtype=torch.float32), True,
                     GemmSwitches(a_sorted=True, tma_weights=True, tma_activations=True, split_k=2, persistent=True)),
}
for name, (a, weights, out, atomic_add, switches) in launches.items():
    gemm1 = name.startswith("gemm1")
    geometry = gemm_geometry(a, weights, out, capacity, topk, atomic_add, c_sorted=switches.c_sorted,
                             a_rows_per_slot=topk if gemm1 else 1, fuse_activation=switches.fuse_activation)
    kernel = compile_grouped_gemm(torch.bfloat16, geometry, config, topk=topk, a_rows_per_slot=topk if gemm1 else 1,
                                  mul_routed_weight=not gemm1, atomic_add=atomic_add, out_dtype=out.dtype,
                                  switches=switches)
    print(name, kernel.metadata.target.arch, "cp.async.bulk.tensor" in kernel.asm["ptx"],
          kernel.metadata.global_scratch_size)
"""


def test_every_switch_compiles_for_hopper_and_tma_becomes_bulk_tensor_copies(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    # name, arch, TMA in the PTX, global scratch bytes per program (128 per device-side descriptor)
    assert result.stdout.splitlines() == [
        "gemm1 90 True 128",
        "gemm1_split 90 False 0",
        "gemm2_store 90 True 256",
        "gemm2_atomic 90 True 256",
    ]
