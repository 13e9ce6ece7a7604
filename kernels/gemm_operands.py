"""What one launch of the grouped GEMM takes besides its tensors, and the checks that it can
run: kernel switches, fp8 scales, operand layouts. Each failure is a ValueError naming the
switch or argument, raised before anything is launched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .align import AlignedTokens

FP8_DTYPE = torch.float8_e4m3fn


class GemmSwitches(NamedTuple):
    """The kernel switches of one launch (grouped_gemm's module doc); all off is the original kernel."""
    a_sorted: bool = False
    c_sorted: bool = False
    fuse_activation: bool = False
    tma_weights: bool = False
    tma_activations: bool = False
    split_k: int = 1
    persistent: bool = False


class Fp8Scales(NamedTuple):
    """Scales of fp8 operands (moetune/quant.py's layouts): a_scale [1] and b_scale [E] per
    tensor (block_shape None), else a_scale [rows of a, ceil(K / block_k)] per token and
    group and b_scale [E, ceil(weight rows / block_n), ceil(K / block_k)] per block."""
    a_scale: torch.Tensor
    b_scale: torch.Tensor
    block_shape: tuple[int, int] | None = None


def check_gemm_switches(s: GemmSwitches, *, atomic_add: bool, mul_routed_weight: bool) -> None:
    """Raise ValueError, naming the switches, for a combination the kernel cannot run."""
    if not isinstance(s.split_k, int) or isinstance(s.split_k, bool) or s.split_k < 1:
        raise ValueError(f"split_k must be an int >= 1, got {s.split_k!r}")
    if s.tma_activations and not s.a_sorted:
        raise ValueError("tma_activations needs a_sorted: gathered A rows cannot load through a tensor descriptor")
    if s.fuse_activation and (atomic_add or mul_routed_weight):
        raise ValueError("fuse_activation is GEMM 1's epilogue: it stores silu(gate) * up, with neither "
                         "atomic_add nor the router weight")
    if s.fuse_activation and s.split_k > 1:
        raise ValueError("fuse_activation and split_k > 1 are incompatible: silu(gate) * up is not a sum of "
                         "the splits' partials")
    if s.c_sorted and atomic_add:
        raise ValueError("c_sorted (rows in aligned order) stores GEMM 1's rows; it cannot go with atomic_add")


def check_block_k(block_shape: tuple[int, int] | None, config: dict, what: str = "config") -> None:
    """Block fp8 scales apply per K tile, so a tile must not straddle two scale groups."""
    if block_shape is not None and block_shape[1] % config["BLOCK_SIZE_K"]:
        raise ValueError(f"{what} BLOCK_SIZE_K={config['BLOCK_SIZE_K']} does not divide block_k={block_shape[1]} of "
                         f"block_shape {list(block_shape)}: a K tile must lie within one scale block")


def _expect(name: str, tensor, shape: tuple, dtype: torch.dtype) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != dtype:
        got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be {list(shape)} {dtype}, got {got}")


def check_fp8_operands(a: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, fp8: Fp8Scales | None,
                       config: dict) -> None:
    """fp8 weights need fp8 A and both scales in their layouts; the unquantized kernel takes neither."""
    quantized = (a.dtype == FP8_DTYPE, weights.dtype == FP8_DTYPE)
    if fp8 is None:
        if any(quantized):
            raise ValueError(f"a {a.dtype} and weights {weights.dtype}: fp8 operands need a_scale and b_scale")
        return
    if not all(quantized):
        raise ValueError(f"with scales both operands must be {FP8_DTYPE}, got a {a.dtype} and weights {weights.dtype}")
    if out.dtype == FP8_DTYPE:
        raise ValueError("out must be in the activation dtype or float32, not fp8")
    experts, rows, k = weights.shape
    if fp8.block_shape is None:
        if not isinstance(fp8.a_scale, torch.Tensor) or fp8.a_scale.numel() != 1 or \
                fp8.a_scale.dtype != torch.float32:
            _expect("a_scale (per tensor)", fp8.a_scale, (1,), torch.float32)
        _expect("b_scale (per tensor)", fp8.b_scale, (experts,), torch.float32)
        return
    block_n, block_k = fp8.block_shape
    groups = -(-k // block_k)
    _expect(f"a_scale (block_k {block_k})", fp8.a_scale, (a.shape[0], groups), torch.float32)
    _expect(f"b_scale (block_shape {list(fp8.block_shape)})", fp8.b_scale, (experts, -(-rows // block_n), groups),
            torch.float32)
    check_block_k(fp8.block_shape, config)


def check_descriptor_operand(switch: str, name: str, tensor: torch.Tensor) -> None:
    """A tensor descriptor needs the last dimension contiguous and 16-byte aligned rows."""
    size = tensor.element_size()
    if tensor.stride(-1) != 1 or any(stride * size % 16 for stride in tensor.stride()[:-1]) or \
            tensor.data_ptr() % 16:
        raise ValueError(f"{switch}: {name} {tuple(tensor.shape)} {tensor.dtype} with strides {tensor.stride()} "
                         "needs its last stride 1, the others and its address 16-byte aligned")


def check_operands(s: GemmSwitches, a, weights, out, aligned: AlignedTokens, atomic_add: bool) -> None:
    capacity = aligned.sorted_ids.numel()
    if s.tma_weights:
        check_descriptor_operand("tma_weights", "weights", weights)
        if weights.stride(0) != weights.shape[1] * weights.stride(1):
            raise ValueError(f"tma_weights: weights {tuple(weights.shape)} with strides {weights.stride()} are not "
                             "one [E * rows, K] matrix")
    if s.tma_activations:
        check_descriptor_operand("tma_activations", "a", a)
    if s.fuse_activation and (weights.shape[1] % 2 or out.shape[-1] != weights.shape[1] // 2):
        raise ValueError(f"fuse_activation: weights {tuple(weights.shape)} must be [E, 2N, K] and out "
                         f"{tuple(out.shape)} N wide")
    partials = s.split_k > 1 and not atomic_add
    if partials and (out.dim() != 3 or out.shape[0] != s.split_k or out.dtype != torch.float32):
        raise ValueError(f"split_k = {s.split_k} with the STORE epilogue writes fp32 partials: out must be "
                         f"[{s.split_k}, rows, N] float32, got {tuple(out.shape)} {out.dtype}")
    if not partials and out.dim() != 2:
        raise ValueError(f"out must be 2-D here, got {tuple(out.shape)}")
    if s.c_sorted and out.shape[-2] < capacity:
        raise ValueError(f"c_sorted: out has {out.shape[-2]} rows, fewer than the alignment's capacity {capacity}")
    if s.a_sorted and a.shape[0] < capacity:
        raise ValueError(f"a_sorted: a has {a.shape[0]} rows, fewer than the alignment's capacity {capacity}")


