"""moetune: autotuned Triton fused-MoE kernels, tuned tables per GPU, and a dispatcher."""

from .device import use_interpreter_without_gpu

# Triton decides between compiling and interpreting when a kernel is defined, so this must
# run before moetune.kernels is imported: without a GPU, kernels run in the interpreter.
use_interpreter_without_gpu()

from .errors import TableError, UsageError  # noqa: E402
from .layer import fused_experts, fused_moe  # noqa: E402
from .loader import Selection, get_config, load_table  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Selection", "TableError", "UsageError", "__version__", "fused_experts", "fused_moe", "get_config",
           "load_table"]
