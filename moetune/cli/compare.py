"""`moetune compare`: the whole MoE layer timed per contender."""

from ..compare import add_arguments, main  # noqa: F401
