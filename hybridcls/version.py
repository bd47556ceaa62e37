"""The package version, in a leaf module that imports nothing (read by the package, the CLI,
run records and checkpoints)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
