"""moetune: autotuned Triton fused-MoE kernels, tuned tables per GPU, and a dispatcher.

Importing moetune changes no environment. On a machine without a GPU, set
TRITON_INTERPRET=1 before the first import of the kernels to run them in Triton's
interpreter (the `moetune` command does so for its own process). The public names load
on first use, so that the command can make that choice before any kernel is defined.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "fused_experts": "layer",
    "fused_moe": "layer",
    "Selection": "loader",
    "get_config": "loader",
    "load_table": "loader",
    "TableError": "errors",
    "UsageError": "errors",
    "LaunchConfig": "types",
    "Role": "types",
    "Variant": "types",
    "Switches": "types",
    "quantize_weights": "quant",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def lazy_names(package: str, public: dict[str, str], namespace: dict):
    """A package's __getattr__ and __dir__ (PEP 562) for public names that load from its
    modules (`public`: name -> module) on first use and then stay in `namespace`."""

    def __getattr__(name: str):
        module = public.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return namespace["__all__"]

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
