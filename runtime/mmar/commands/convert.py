"""`mmar convert`: see mmar.convert (the same code as the `nvmidl-dataconvert` console script)."""

from mmar.convert.cli import main

__all__ = ["main"]
