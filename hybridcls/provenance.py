"""The run record: what made an output, so that anyone who reads it later can trace it.

A :class:`RunRecord` says which hybridcls and which libraries ran (their
versions), with which models (the id and the weights' SHA-256 of both
towers, and a short :func:`model_version` naming them with the gate and the
class texts), with which gate settings, how it was asked for (the command
line, or the Python function and its parameters), on what (the device and
precision the engine applied), when (start and end, UTC ISO 8601) and what
came out (counts: predicted, failed, unknown for a prediction).

Where it is written:

* ``predict`` with ``output=FILE``: the manifest beside the file (its
  ``record``; :mod:`hybridcls.sharding`), once before the first row and again,
  complete, after the last; a merge keeps the parts' records;
* ``embed``: the manifest beside the ``.npz`` / ``.parquet`` file
  (:mod:`hybridcls.embeddings`), counts ``embedded``, ``failed``, ``resumed``;
* every command: ``--log FILE`` (the record, the exit status and the error, if any);
* ``evaluate`` and ``report``: ``metrics.json`` holds the record of the
  predictions they read (from the manifest beside them) and their own.

Torch-free: a library not imported yet gives the version of its installed distribution.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hybridcls.cache import atomic_write_json, stable_hash

__all__ = [
    "MODEL_VERSION_LENGTH",
    "PACKAGES",
    "RECORD_KIND",
    "RunRecord",
    "jsonable",
    "model_version",
    "package_versions",
    "tower_identity",
    "utc_now",
]

RECORD_KIND = "hybridcls-run-record"
_RECORD_VERSION = 1
#: The libraries whose versions a record carries: import name -> distribution name.
PACKAGES = {
    "hybridcls": "hybridcls",
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "open_clip": "open_clip_torch",
    "huggingface_hub": "huggingface_hub",
}
#: Hex digits of :func:`model_version` (48 bits: no two models of one user collide).
MODEL_VERSION_LENGTH = 12


def package_versions() -> dict[str, str | None]:
    """The version of each of :data:`PACKAGES` (and Python's), ``None`` for one not installed.

    A library already imported gives its ``__version__`` (what actually runs); another one
    the version of its installed distribution, so that a command that needs no torch
    (``evaluate``) does not import it to say which one is installed.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for module, dist in PACKAGES.items():
        version = getattr(sys.modules.get(module), "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = None
        out[module] = None if version is None else str(version)
    return out


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with microseconds (``2026-01-31T12:00:00.000000+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def tower_identity(model_id: str, fingerprint: str | None, **more: Any) -> dict[str, Any]:
    """One tower in a record: its id as asked for and its weights' fingerprint, then ``more``.

    Example:
        >>> tower_identity("ViT-B-32", "ab12", pretrained="laion2b_s34b_b79k")
        {'model_id': 'ViT-B-32', 'fingerprint': 'ab12', 'pretrained': 'laion2b_s34b_b79k'}
    """
    return {"model_id": model_id, "fingerprint": fingerprint, **more}


def model_version(supervised: str | None, clip: str | None, gate: Mapping[str, Any] | None,
                  prompts_sha256: str | None) -> str:
    """A short id of the model that makes predictions: both towers, the gate, the class texts.

    The first :data:`MODEL_VERSION_LENGTH` hex digits of :func:`~hybridcls.cache.stable_hash`
    over the supervised and CLIP weights' fingerprints (content hashes: the same files
    anywhere give the same id), the calibrated gate's settings as ``gate.json`` holds them,
    and the hash of the prompts and templates (the zero-shot head). Prediction-time options
    (``mode``, ``unknown_threshold``, ``cascade``) are not part of it: the run record keeps
    them. SpeciesNet writes such a ``model_version`` on every prediction.

    Args:
        supervised: The supervised weights' SHA-256; ``None`` for zero-shot only.
        clip: The CLIP weights' fingerprint (:attr:`~hybridcls.zeroshot.loading.ClipBundle.fingerprint`).
        gate: The calibration's JSON content (``GateCalibration.to_dict`` read back from
            JSON); ``None`` for zero-shot only.
        prompts_sha256: The hash of the prompts and templates.

    Example:
        >>> v = model_version("a" * 64, "b" * 64, None, "c" * 64)
        >>> len(v), v == model_version("a" * 64, "b" * 64, None, "c" * 64)
        (12, True)
    """
    key = {"supervised": supervised, "clip": clip, "gate": gate, "prompts": prompts_sha256}
    return stable_hash(key)[:MODEL_VERSION_LENGTH]


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: paths as text, sequences as lists, others as their repr.

    Example:
        >>> jsonable({"inputs": (Path("a.jpg"), 3), "seen": {"fox"}})
        {'inputs': ['a.jpg', 3], 'seen': ['fox']}
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return repr(value)


@dataclass
class RunRecord:
    """How an output was made (see the module docstring for where it is written).

    Attributes:
        command: The subcommand (``predict``) or the Python function
            (``hybridcls.eval.report.evaluate_predictions``) that made the output.
        argv: The command line as run, program name first; ``None`` for a Python call.
        call: A Python call: ``{"function": ..., "parameters": {...}}``; ``None`` for
            the command line.
        versions: :func:`package_versions`.
        models: The classifier's :meth:`~hybridcls.predictor.Predictor.model_identity`
            (``supervised`` and ``clip`` towers: id and fingerprint; ``model_version``).
        gate: The gate's settings as predictions use them (:meth:`hybridcls.gate.Gate.summary`).
        runtime: What the inference engine applied: device, precision, autocast, batch size...
        inputs: What a command read that another run made: for ``evaluate``, the predictions
            file (path, SHA-256, and the record from its manifest) and the labels file.
        started: When the command started, UTC ISO 8601.
        finished: When its output was complete; ``None`` while it runs (a manifest of
            a run that was killed keeps ``None``).
        counts: What came out: ``predicted``, ``failed``, ``unknown`` (and ``resumed``:
            rows an earlier run of the same settings wrote) for a prediction.
    """

    command: str
    argv: list[str] | None = None
    call: dict[str, Any] | None = None
    versions: dict[str, str | None] = field(default_factory=package_versions)
    models: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None
    started: str = field(default_factory=utc_now)
    finished: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    kind: str = RECORD_KIND
    version: int = _RECORD_VERSION

    @classmethod
    def for_call(cls, function: str, **parameters: Any) -> RunRecord:
        """The record of a Python call, started now.

        Example:
            >>> r = RunRecord.for_call("hybridcls.eval.report.evaluate_predictions", predictions=Path("p.csv"))
            >>> r.call
            {'function': 'hybridcls.eval.report.evaluate_predictions', 'parameters': {'predictions': 'p.csv'}}
        """
        return cls(command=function, call={"function": function, "parameters": jsonable(parameters)})

    def describe(self, classifier: Any) -> RunRecord:
        """Fill ``models``, ``gate`` and ``runtime`` from a fitted classifier (either kind).

        Args:
            classifier: A fitted :class:`~hybridcls.HybridClassifier` or
                :class:`~hybridcls.ZeroShotClassifier`.
        """
        self.models = classifier.model_identity()
        self.gate = classifier.gate_summary()
        self.runtime = dict(classifier.engine_.applied)
        return self

    def finish(self, **counts: int) -> RunRecord:
        """Stamp the end time and, when given, set ``counts`` (a later call moves both: a merge
        after its parts). The versions are read again: the libraries the run imported since
        it started give their own ``__version__``."""
        self.versions = package_versions()
        self.finished = utc_now()
        if counts:
            self.counts = {k: int(v) for k, v in counts.items()}
        return self

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (what manifests and logs hold)."""
        return jsonable(asdict(self))

    def write_log(self, path: str | os.PathLike[str], *, exit_status: int | None,
                  error: str | None = None) -> Path:
        """Write the record with the command's outcome to ``path`` (strict JSON, atomically).

        Args:
            path: The log file (its folder is created).
            exit_status: The command's exit status; ``None`` when it stopped on an
                unexpected exception.
            error: The error message it stopped with, if any.

        Returns:
            The file written.
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, {**self.as_dict(), "exit_status": exit_status, "error": error},
                          indent=1)
        return out
