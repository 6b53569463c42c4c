"""bundlekd-edge: knowledge distillation for LLM bundle generation, shipped to the edge."""

__version__ = "0.1.0"


class BkdError(Exception):
    """A user-facing error: the message says what is wrong and where (file, line, field)."""


def __getattr__(name: str):
    """`from bundlekd_edge import Student`, imported on first use: the CLI's commands that need no
    model (data, eval) do not load llama.cpp."""
    if name == "Student":
        from .student import Student

        return Student
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BkdError", "Student", "__version__"]
