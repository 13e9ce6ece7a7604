"""The fp8 kernels compile for Hopper (sm_90) without a GPU, as fp8 tensor-core MMAs.

The interpreter runs fp8 dots by upcasting to fp16 and has its own fp32 -> fp8 cast; this
builds the binaries a GPU would run, as the tuner's compile workers do, and checks that the
GEMM's dot became a wgmma on e4m3 operands (per-tensor and block scales, GEMM 1 with its
fused activation and GEMM 2 with the atomic epilogue and every switch it takes) and that
the quantization kernels cast with the hardware's saturating round-to-nearest.
"""

import os
import subprocess
import sys

COMPILE_FOR_HOPPER = """
import functools, re
import torch
from triton.runtime import driver
from moetune.tune.compile_pool import compile_only_driver
from moetune.kernels import (LiveRows, compile_grouped_gemm, gemm_geometry, max_padded_rows, quantize_per_tensor,
                             quantize_per_token_group, silu_and_mul_fp8)
from moetune.kernels.grouped_gemm import Fp8Scales, GemmSwitches
from moetune.kernels.launch import compile_only

driver.set_active(compile_only_driver((9, 0)))
meta = functools.partial(torch.empty, device="meta")
fp8, f32 = torch.float8_e4m3fn, torch.float32
M, E, N, K, topk = 64, 8, 256, 512, 2
capacity = max_padded_rows(M * topk, E, 64)
config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 4, "num_warps": 4,
          "num_stages": 3}
for block in (None, (128, 128)):
    def scales(a_rows, w_rows, k):
        if block is None:
            return Fp8Scales(meta(1, dtype=f32), meta(E, dtype=f32), None)
        return Fp8Scales(meta(a_rows, k // 128, dtype=f32), meta(E, w_rows // 128, k // 128, dtype=f32), block)

    launches = {
        "gemm1": (meta(M, K, dtype=fp8), meta(E, 2 * N, K, dtype=fp8), meta(capacity, N, dtype=torch.bfloat16), False,
                  GemmSwitches(c_sorted=True, fuse_activation=True, tma_weights=True, persistent=True),
                  scales(M, 2 * N, K)),
        "gemm2": (meta(capacity, N, dtype=fp8), meta(E, K, N, dtype=fp8), meta(M, K, dtype=f32), True,
                  GemmSwitches(a_sorted=True, tma_weights=True, tma_activations=True, split_k=2, persistent=True),
                  scales(capacity, K, N)),
    }
    for name, (a, weights, out, atomic_add, switches, fp8_scales) in launches.items():
        gemm1 = name == "gemm1"
        geometry = gemm_geometry(a, weights, out, capacity, topk, atomic_add, c_sorted=switches.c_sorted,
                                 a_rows_per_slot=topk if gemm1 else 1, fuse_activation=switches.fuse_activation,
                                 fp8=fp8_scales)
        kernel = compile_grouped_gemm(fp8, geometry, config, topk=topk, a_rows_per_slot=topk if gemm1 else 1,
                                      mul_routed_weight=not gemm1, atomic_add=atomic_add, out_dtype=out.dtype,
                                      switches=switches, block_shape=block)
        # e.g. wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3: accumulator, A and B types
        mmas = sorted({tuple(op.split(".")[-3:]) for op in re.findall(r"wgmma\\.mma_async\\S*", kernel.asm["ptx"])})
        print(name, "block" if block else "per-tensor", kernel.metadata.target.arch, mmas)
with compile_only() as compiled:
    x = meta(M, K, dtype=torch.bfloat16)
    quantize_per_token_group(x, 128)
    quantize_per_tensor(x)
    silu_and_mul_fp8(meta(M, 2 * N, dtype=torch.bfloat16), 128, dtype=torch.bfloat16, live=LiveRows())
for kernel in compiled:
    print(kernel.name, sorted(set(re.findall(r"cvt\\.\\S*e4m3\\S*", kernel.asm["ptx"]))))
"""


def test_fp8_kernels_compile_for_hopper_to_e4m3_tensor_core_mmas(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    e4m3 = "[('f32', 'e4m3', 'e4m3')]"
    assert result.stdout.splitlines() == [
        f"gemm1 per-tensor 90 {e4m3}",
        f"gemm2 per-tensor 90 {e4m3}",
        f"gemm1 block 90 {e4m3}",
        f"gemm2 block 90 {e4m3}",
        "_group_quant_kernel ['cvt.rn.satfinite.e4m3x2.f32']",
        "_amax_kernel []",  # quantize_per_tensor's first kernel, before the one that quantizes
        "_tensor_quant_kernel ['cvt.rn.satfinite.e4m3x2.f32']",
        "_silu_and_mul_kernel ['cvt.rn.satfinite.e4m3x2.f32']",
    ]
