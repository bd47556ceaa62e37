"""Exceptions that carry a message meant for a person.

Every error the library raises on bad user input derives from
:class:`HybridclsError`; the command line prints its message (no traceback)
and exits with status 2. Messages name the file, line or flag involved.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DatasetError",
    "HybridclsError",
    "ImageDecodeError",
    "InputError",
    "MissingExtraError",
    "PromptFileError",
    "WeightsUnavailableError",
]


class HybridclsError(Exception):
    """Base class for errors caused by the user's input or environment."""


class InputError(HybridclsError, ValueError):
    """An input path, list file or option value that cannot be used."""


class PromptFileError(HybridclsError, ValueError):
    """A prompts or templates file that cannot be parsed; names the file and line."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class ImageDecodeError(HybridclsError, ValueError):
    """An image file that cannot be read; ``reason`` is what goes into an error row."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(HybridclsError, ValueError):
    """A training or validation folder that cannot be used as it is."""


class WeightsUnavailableError(HybridclsError, RuntimeError):
    """Model weights that cannot be found locally nor downloaded."""


class CheckpointError(HybridclsError, ValueError):
    """A run directory or checkpoint that is missing, corrupt or incompatible."""


class MissingExtraError(HybridclsError, ImportError):
    """An optional dependency is not installed; names the feature and the extra that brings it."""

    def __init__(self, feature: str, module: str, extra: str) -> None:
        self.feature = feature
        self.module = module
        self.extra = extra
        super().__init__(
            f"{feature} needs the optional dependency {module!r}, which is not installed: "
            f"pip install 'hybridcls[{extra}]'"
        )
