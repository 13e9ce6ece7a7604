"""The tuner: one Optuna study per (device, shape, dtype, role, batch size), then the layer.

`tune(settings)` runs a tune, `collect(settings)` writes the tables from studies that
`moetune run --worker` processes filled; `TuneSettings` says what to tune. The names load
on first use, so that importing a part (the search space, say) imports no kernel.
"""

from importlib import import_module

# public name -> the module of this package that defines it
_PUBLIC = {
    "TuneSettings": "run",
    "tune": "run",
    "collect": "run",
    "Compiler": "run",
    "compiler_for": "run",
    "worker_salt": "run",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
