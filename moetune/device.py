"""Which device runs the kernels: a CUDA GPU, or Triton's interpreter on the CPU."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import threading
from dataclasses import dataclass

import torch


CPU_KEY = "cpu"
INTERPRET_ENV = "TRITON_INTERPRET"
# Shared memory a block may opt in to on Hopper (H100, H200): the limit assumed when none is known.
HOPPER_SHARED_MEMORY_BYTES = 232448

# Shared memory a block may opt in to, per compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability"): what a table tuned on such a device
# was pruned against.
SHARED_MEMORY_BY_CAPABILITY = {
    (7, 0): 98304, (7, 5): 65536,
    (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376,
    (9, 0): 232448, (10, 0): 232448, (10, 3): 232448, (12, 0): 101376,
}


def shared_memory_for_capability(capability: tuple[int, int] | None) -> int:
    """Shared memory per block on a device of this compute capability; Hopper's when the
    capability is unknown or None (the interpreter, which has no limit of its own)."""
    if capability is None:
        return HOPPER_SHARED_MEMORY_BYTES
    return SHARED_MEMORY_BY_CAPABILITY.get(tuple(capability), HOPPER_SHARED_MEMORY_BYTES)


def gpu_count() -> int:
    """CUDA GPUs this process may use, asked of the driver's NVML library.

    Never initializes CUDA: on a CUDA build of torch without a driver, even
    torch.cuda.device_count() marks the process so that forked children cannot run,
    and `moetune run` forks its compile processes after this check.
    """
    if torch.version.cuda is None:  # a CPU build of torch cannot run the kernels on a GPU
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    count = _nvml_device_count()
    if visible is not None:
        count = min(count, len([part for part in visible.split(",") if part.strip()]))
    return count


def _nvml_device_count() -> int:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        return int(count.value) if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def interpreter_enabled() -> bool:
    """Whether the kernels run in Triton's interpreter: Triton chose so when they were
    defined, so the kernels are what to ask (this imports them)."""
    from .kernels import interpreted_kernels

    return interpreted_kernels()


def choose_interpreter_without_gpu() -> None:
    """For a command-line process: run kernels in Triton's interpreter when no GPU exists.

    Must run before moetune.kernels is imported (Triton chooses between compiling and
    interpreting when a kernel is defined). The library never calls it: setting the
    variable would turn every other library's Triton kernels defined later into
    interpreted ones.
    """
    if gpu_count() == 0:
        os.environ.setdefault(INTERPRET_ENV, "1")


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
    if gpu_count() > 0 and not interpreter_enabled():
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or HOPPER_SHARED_MEMORY_BYTES
        return DeviceInfo(props.name, device_key(props.name), (props.major, props.minor), int(smem))
    # The interpreter has no shared-memory limit; use Hopper's so pruning behaves alike.
    return DeviceInfo(CPU_KEY, CPU_KEY, None, HOPPER_SHARED_MEMORY_BYTES)


def torch_device() -> torch.device:
    return torch.device("cuda") if gpu_count() > 0 and not interpreter_enabled() else torch.device("cpu")
