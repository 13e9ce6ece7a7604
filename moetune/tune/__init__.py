"""The tuner: one Optuna study per (device, shape, dtype, role, batch size), then the layer.

`tune(settings)` runs a tune, `collect(settings)` writes the tables from studies that
`moetune run --worker` processes filled; `TuneSettings` says what to tune. The names load
on first use, so that importing a part (the search space, say) imports no kernel.
"""

from .. import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
