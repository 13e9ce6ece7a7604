"""Which device runs the kernels: a CUDA GPU, or Triton's interpreter on the CPU."""

from __future__ import annotations

import multiprocessing
import os
import threading
from dataclasses import dataclass

import torch

from .configs import HOPPER_SHARED_MEMORY_BYTES

CPU_KEY = "cpu"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_interpreter_without_gpu() -> None:
    """Run kernels in Triton's interpreter when no GPU exists.

    Must be called before any @triton.jit function is defined: Triton chooses between
    compiling and interpreting when the decorator runs.
    """
    # device_count asks NVML, which leaves CUDA uninitialized: `run --devices` forks its
    # workers after this import, and CUDA cannot be used in a child forked after cuInit.
    if torch.cuda.device_count() == 0:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def forked_after_cuda() -> bool:
    """Whether this process was forked from one that had initialized CUDA: CUDA then
    refuses to work here."""
    return bool(getattr(torch._C, "_cuda_isInBadFork", lambda: False)())


def fork_is_safe() -> bool:
    """Whether children forked now can use CUDA and run: CUDA untouched here, and no other
    thread that might hold a lock the children would inherit locked."""
    return ("fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
            and not forked_after_cuda() and threading.active_count() == 1)


def device_key(name: str) -> str:
    """Folder name of a device's tables: the device name with spaces replaced by '_'."""
    return name.strip().replace(" ", "_")


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # e.g. "NVIDIA H200", or "cpu" under the interpreter
    key: str  # e.g. "NVIDIA_H200"
    compute_capability: tuple[int, int] | None
    shared_memory_bytes: int  # per block, opt-in maximum

    @property
    def is_gpu(self) -> bool:
        return self.compute_capability is not None


def local_device(index: int | None = None) -> DeviceInfo:
    if torch.cuda.is_available() and not interpreter_enabled():
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or HOPPER_SHARED_MEMORY_BYTES
        return DeviceInfo(props.name, device_key(props.name), (props.major, props.minor), int(smem))
    # The interpreter has no shared-memory limit; use Hopper's so pruning behaves alike.
    return DeviceInfo(CPU_KEY, CPU_KEY, None, HOPPER_SHARED_MEMORY_BYTES)


def torch_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and not interpreter_enabled() else torch.device("cpu")
