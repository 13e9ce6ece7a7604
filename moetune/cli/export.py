"""`moetune export`: write tables as vLLM or SGLang config files."""

from ..export import add_arguments, main  # noqa: F401
