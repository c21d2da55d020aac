"""mmar: the runtime of the Medical Model ARchive platform (CLI, data, training, inference, export)."""

__version__ = "0.1.0"
