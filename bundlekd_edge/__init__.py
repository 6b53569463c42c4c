"""bundlekd-edge: knowledge distillation for LLM bundle generation, shipped to the edge."""

__version__ = "0.1.0"


class BkdError(Exception):
    """A user-facing error: the message says what is wrong and where (file, line, field)."""
