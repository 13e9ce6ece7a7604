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
  split_k      both GEMMs split their K range over split_k programs per tile. Partials are
               fp32: GEMM 1's [split_k, rows, 2N] are summed by the activation kernel, GEMM 2's
               [split_k, M, topk, K] by the top-k sum (no extra kernel); GEMM 2's atomic
               epilogue adds each split's partial into out. Not with fuse_activation (the
               epilogue is not linear in the partials).
  persistent   about one program per SM (num_programs), each looping over the live tiles,
               counted from the aligned rows in use, instead of a worst-case grid.
Triton 3.6's interpreter runs all of them, the descriptor loads included (grouped_gemm.py
says what it does not check).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class KernelSwitches:
    sorted_rows: bool = False
    fuse_activation: bool = False
    tma_weights: bool = False
    tma_activations: bool = False
    split_k: int = 1
    persistent: bool = False

    def validate(self) -> "KernelSwitches":
        """Raise ValueError naming the switches of an invalid combination; returns self."""
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "split_k":
                if type(value) is not int or value < 1:
                    raise ValueError(f"split_k must be an int >= 1, got {value!r}")
            elif not isinstance(value, bool):
                raise ValueError(f"{field.name} must be a bool, got {value!r}")
        if self.tma_activations and not self.sorted_rows:
            raise ValueError("tma_activations needs sorted_rows: GEMM 2's A rows are contiguous per block only "
                             "in the sorted intermediate")
        if self.fuse_activation and self.split_k > 1:
            raise ValueError(f"fuse_activation and split_k = {self.split_k} are incompatible: they cannot go "
                             "together, since GEMM 1's silu(gate) * up epilogue cannot run on split-K partials")
        return self

    def check_configs(self, gemm1_config: dict, gemm2_config: dict) -> None:
        """Raise ValueError where the launch configs cannot run with these switches."""
        if self.sorted_rows and gemm1_config["BLOCK_SIZE_M"] != gemm2_config["BLOCK_SIZE_M"]:
            raise ValueError(
                f"sorted_rows needs one BLOCK_SIZE_M for both GEMMs, got {gemm1_config['BLOCK_SIZE_M']} and "
                f"{gemm2_config['BLOCK_SIZE_M']}: GEMM 2 reads GEMM 1's rows in GEMM 1's aligned order")


OFF = KernelSwitches()
