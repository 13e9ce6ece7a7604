"""Compile-time switches of the expert kernels: one point of the space the tuner picks from.

All off is the layer's original path: GEMM 1 stores [M*topk, 2N] by slot, a SiLU-and-mul
kernel halves it, GEMM 2 gathers its rows through sorted_ids.

  sorted_rows  GEMM 1 writes its rows in aligned (sorted, block-padded) order, the
               activation runs over those rows (padding skipped) and GEMM 2 reads its A rows
               contiguously by aligned position, still storing / adding at each row's slot.
               GEMM 2 then reuses GEMM 1's alignment, so both configs need the same
               BLOCK_SIZE_M.
  fuse_activation  SiLU-and-mul in GEMM 1's epilogue: each program computes a gate tile and
               its up tile over the same A tiles and stores silu(gate) * up, so the [rows, 2N]
               buffer and the activation kernel go away. w1 keeps its [E, 2N, K] layout.
  tma_weights  both GEMMs load weight tiles through tensor descriptors (TMA on Hopper).
  tma_activations  GEMM 2 loads its A tiles through a tensor descriptor; needs sorted_rows
               (only then are a block's rows contiguous).
Triton 3.6's interpreter runs the descriptor loads (grouped_gemm.py says what it does not check).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSwitches:
    sorted_rows: bool = False
    fuse_activation: bool = False
    tma_weights: bool = False
    tma_activations: bool = False

    def validate(self) -> "KernelSwitches":
        """Raise ValueError naming the switches of an invalid combination; returns self."""
        for name in ("sorted_rows", "fuse_activation", "tma_weights", "tma_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.tma_activations and not self.sorted_rows:
            raise ValueError("tma_activations needs sorted_rows: GEMM 2's A rows are contiguous per block only "
                             "in the sorted intermediate")
        return self

    def check_configs(self, gemm1_config: dict, gemm2_config: dict) -> None:
        """Raise ValueError where the launch configs cannot run with these switches."""
        if self.sorted_rows and gemm1_config["BLOCK_SIZE_M"] != gemm2_config["BLOCK_SIZE_M"]:
            raise ValueError(
                "sorted_rows: GEMM 2 reads GEMM 1's rows in GEMM 1's aligned order, so its BLOCK_SIZE_M "
                f"({gemm2_config['BLOCK_SIZE_M']}) must equal GEMM 1's ({gemm1_config['BLOCK_SIZE_M']})")


OFF = KernelSwitches()
