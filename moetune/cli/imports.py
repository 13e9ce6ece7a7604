"""`moetune import`: read vLLM/SGLang config files into a folder for --baseline-configs."""

from ..export import add_arguments, main  # noqa: F401
