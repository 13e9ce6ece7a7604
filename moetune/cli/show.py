"""`moetune show`: the tables this machine uses and the configs picked per batch size."""

from ..loader import add_arguments, main  # noqa: F401
