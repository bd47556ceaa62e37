"""Exceptions that carry a message meant for a person.

Every error the library raises on bad user input derives from
:class:`HybridclsError`; the command line prints its message (no traceback)
and exits with the error's :attr:`~HybridclsError.exit_code`: 2 for usage
errors (a bad option, file or folder), 1 for :class:`DataTooSmallError` (the
command was used correctly but the data cannot support what it asks).
Messages name the file, line or parameter involved.

Warnings the user should hear about derive from :class:`HybridclsWarning`
(the command line prints them as one ``warning:`` line, in its flags' words):
:class:`ClassTextWarning` (class text cut to the model's context on request,
classes the model can hardly tell apart), :class:`ResourceUseWarning`
(the device ran out of memory and the batch was split, a cache could not be
written), :class:`SiteFileWarning` (a site file row that reaches none of the
inputs) and :class:`MissingDataWarning` (a fit that runs without data the run
records, which is not here). :func:`name_some` lists a few of many items in a
message, the rest counted; :func:`named_path` names a file or folder as the parameter that gave it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "ClassTextWarning",
    "DataTooSmallError",
    "DatasetError",
    "HybridclsError",
    "HybridclsWarning",
    "ImageDecodeError",
    "InputError",
    "MissingDataWarning",
    "MissingExtraError",
    "ParameterError",
    "PromptFileError",
    "ResourceUseWarning",
    "SiteFileWarning",
    "WeightsUnavailableError",
    "name_some",
    "named_path",
]


class HybridclsError(Exception):
    """Base class for errors caused by the user's input or environment.

    Attributes:
        exit_code: The command line's exit status for this error (2: usage error).
    """

    exit_code: int = 2


class InputError(HybridclsError, ValueError):
    """An input path, list file or option value that cannot be used."""


class ParameterError(InputError):
    """A parameter value that cannot be used; names the Python parameter.

    The message reads ``name=value: reason``. The command line shows the same
    error with the flag that sets the parameter (``--batch-size 0: ...``), through
    one table in :mod:`hybridcls.cli.common`.

    Attributes:
        parameter: The Python parameter's name (``batch_size``).
        value: The value given.
        reason: What is wrong with it, and what is expected.

    Example:
        >>> str(ParameterError("batch_size", 0, "expected a positive integer"))
        'batch_size=0: expected a positive integer'
    """

    def __init__(self, parameter: str, value: object, reason: str) -> None:
        self.parameter = parameter
        self.value = value
        self.reason = reason
        super().__init__(f"{parameter}={value!r}: {reason}")


class PromptFileError(HybridclsError, ValueError):
    """A prompts or templates file that cannot be parsed; names the file and line.

    With ``parameter`` (a file that cannot be read at all), the message starts
    ``parameter='path': `` as :class:`ParameterError`'s does, so that a user who gave
    several files learns which option gave this one (the command line: its flag).
    """

    def __init__(self, path: str, line: int | None, reason: str, *,
                 parameter: str | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        self.parameter = parameter
        where = (named_path(self.path, parameter) if parameter is not None or line is None
                 else f"{self.path}:{line}")
        super().__init__(f"{where}: {reason}")


class ImageDecodeError(HybridclsError, ValueError):
    """An image file that cannot be read; ``reason`` is what goes into an error row."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(HybridclsError, ValueError):
    """A training or validation folder that cannot be used as it is."""


class DataTooSmallError(DatasetError):
    """Data too small for what was asked (too few classes or images); says what to do instead.

    Not a usage error: the command line exits with status 1.
    """

    exit_code = 1


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


class HybridclsWarning(UserWarning):
    """Base class of the warnings meant for a person (the command line prints them as one line)."""


class ClassTextWarning(HybridclsWarning):
    """Class text the model does not fully see, or classes it can hardly tell apart; names lines."""


class ResourceUseWarning(HybridclsWarning, RuntimeWarning):
    """The run goes on, at a cost: the device ran out of memory and batches are split, a cache
    could not be written and is rebuilt next time."""


class SiteFileWarning(HybridclsWarning):
    """A site file row that reaches none of the inputs (a misspelt folder or site name?): its
    classes limit no image. Names the file, the line and the prefix or site."""


class MissingDataWarning(HybridclsWarning):
    """A fit runs without data the run records, which is not here (a moved training folder);
    says what is left out and how to give it."""


def name_some(items: Sequence[object], limit: int = 5) -> str:
    """The first ``limit`` of ``items`` for a message, the rest counted: ``a, b and 3 more``.

    Example:
        >>> name_some(["a.png", "b.png", "c.png"], limit=2)
        'a.png, b.png and 1 more'
    """
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(map(str, items[:limit])) + more


def named_path(path: str | os.PathLike[str], parameter: str | None = None) -> str:
    """A file or folder as an error starts with it: ``parameter='path'`` when a parameter gave it
    (as :class:`ParameterError` writes it, so that the command line shows its flag:
    :func:`hybridcls.cli.common.flag_message`), else the path.

    Example:
        >>> named_path("runs/seen40", "run_dir"), named_path("runs/seen40")
        ("run_dir='runs/seen40'", 'runs/seen40')
    """
    return f"{parameter}={os.fspath(path)!r}" if parameter else os.fspath(path)
