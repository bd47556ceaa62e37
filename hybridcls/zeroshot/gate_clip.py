"""The CLIP and templates a gate was calibrated with: what a run loads, and the check that it is that.

A gate's threshold, its scores' standardisation and its ``index/clip.*`` are
set on one CLIP model's outputs; another CLIP's scores lie on another scale,
and the gate's decisions with them mean nothing. ``calibrate`` records the
CLIP in ``gate.json`` (:attr:`hybridcls.gate.GateCalibration.clip`, as
:meth:`hybridcls.zeroshot.loading.ClipBundle.identity` gives it). A run loaded
without a CLIP chosen (``clip_model=None``, no ``--clip-model``) loads that one
(:func:`clip_to_load`); a run loaded with another is refused wherever its gate
is used (:func:`clip_mismatch`), and only a new calibration replaces the record.

Which CLIP is "the same": the weights' fingerprint identifies it (a
``local-dir:`` folder moved elsewhere, or the ``hf-hub:`` repo it was copied
from, holds the same file), and for built-in names the name too (two
architectures can read one weights file).

The prompt templates move the zero-shot scores as much (the class-text matrix
is their mean): the record keeps them too (``templates``), a run loaded without
templates chosen uses them (:func:`templates_to_load`), and other templates are
refused like another CLIP (:func:`templates_mismatch`). A record written before
it kept the templates leaves them unchecked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hybridcls.errors import ParameterError
from hybridcls.gate.config import GATE_FILENAME, GateCalibration
from hybridcls.zeroshot.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, MODEL_PREFIXES
from hybridcls.zeroshot.prompts import as_template_set

__all__ = ["CLIP_PARAMETERS", "RECORDED_TEMPLATES", "clip_mismatch", "clip_to_load", "describe_clip",
           "recorded_clip", "templates_difference", "templates_mismatch", "templates_to_load"]

#: The parameters that choose the CLIP (errors naming them are about the CLIP loaded).
CLIP_PARAMETERS = ("clip_model", "clip_pretrained")
#: Where messages say the templates a gate recorded come from (their item number as the line).
RECORDED_TEMPLATES = f"<templates recorded in {GATE_FILENAME}>"
# How many hex digits of a fingerprint a message shows.
_SHOWN = 12


def recorded_clip(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The CLIP recorded in ``directory``'s ``gate.json``, or None (no gate, or one written before
    the record was kept).

    Raises:
        CheckpointError: A ``gate.json`` that is not valid.
    """
    path = Path(directory) / GATE_FILENAME
    return GateCalibration.from_json(path).clip if path.is_file() else None


def clip_to_load(clip_model: str | None, clip_pretrained: str | None,
                 record: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """The ``(model, pretrained)`` to load for a run whose gate recorded ``record``.

    Args:
        clip_model: The parameter: None = not chosen: the recorded model, else
            :data:`~hybridcls.zeroshot.defaults.DEFAULT_CLIP_MODEL`.
        clip_pretrained: The parameter: at its default (``DEFAULT_CLIP_PRETRAINED``) with
            ``clip_model=None``, the recorded tag or file; anything else is used as given
            (weights kept under another path here; the fingerprint check follows).
        record: :func:`recorded_clip`'s answer.

    Returns:
        The model id and the pretrained tag or file, None for an ``hf-hub:`` / ``local-dir:``
        model (its weights come with it) and for random weights.

    Example:
        >>> clip_to_load(None, DEFAULT_CLIP_PRETRAINED, {"model_id": "local-dir:clip", "pretrained": None})
        ('local-dir:clip', None)
        >>> clip_to_load(None, DEFAULT_CLIP_PRETRAINED, None)
        ('ViT-B-32', 'laion2b_s34b_b79k')
    """
    model = clip_model
    pretrained = clip_pretrained or None
    if model is None and record is not None:
        model = str(record["model_id"])
        if clip_pretrained == DEFAULT_CLIP_PRETRAINED:
            pretrained = record.get("pretrained")
    model = model or DEFAULT_CLIP_MODEL
    if model.startswith(MODEL_PREFIXES) and pretrained == DEFAULT_CLIP_PRETRAINED:
        pretrained = None  # the default tag is no choice of such a model's weights
    return model, pretrained


def describe_clip(record: Mapping[str, Any]) -> str:
    """A CLIP record as the parameters that load it, and its weights' fingerprint.

    Example:
        >>> describe_clip({"model_id": "ViT-B-32", "pretrained": "openai", "fingerprint": "ab" * 32})
        "clip_model='ViT-B-32' clip_pretrained='openai' (weights abababababab...)"
    """
    pretrained = record.get("pretrained")
    return (f"clip_model={record.get('model_id')!r}"
            + (f" clip_pretrained={pretrained!r}" if pretrained else "")
            + f" (weights {str(record.get('fingerprint'))[:_SHOWN]}...)")


def _same_model(recorded: str, loaded: str) -> bool:
    """Built-in names must agree; an ``hf-hub:`` / ``local-dir:`` id may name the same weights elsewhere."""
    return recorded == loaded or recorded.startswith(MODEL_PREFIXES) or loaded.startswith(MODEL_PREFIXES)


def clip_mismatch(record: Mapping[str, Any] | None, loaded: Mapping[str, Any], *,
                  clip_model: str | None, clip_pretrained: str | None,
                  gate_file: str | os.PathLike[str]) -> ParameterError | None:
    """Why a gate calibrated with ``record`` cannot be used with the ``loaded`` CLIP, or None.

    Args:
        record: The gate's record (:func:`recorded_clip`); None = not recorded: nothing to check.
        loaded: The CLIP loaded (:meth:`~hybridcls.zeroshot.loading.ClipBundle.identity`).
        clip_model: The ``clip_model`` parameter as given (None: not chosen).
        clip_pretrained: The pretrained tag or file loaded.
        gate_file: The ``gate.json`` the record is from (named in the message).

    Returns:
        A :class:`~hybridcls.errors.ParameterError` naming ``clip_pretrained`` when a
        built-in model's weights differ, else ``clip_model``, and what the gate was
        calibrated with; None when it is the same CLIP.
    """
    if record is None:
        return None
    same_model = _same_model(str(record.get("model_id")), str(loaded["model_id"]))
    if same_model and record.get("fingerprint") == loaded["fingerprint"]:
        return None
    loaded_id = str(loaded["model_id"])
    if str(record.get("model_id")) == loaded_id and not loaded_id.startswith(MODEL_PREFIXES):
        name, value = "clip_pretrained", clip_pretrained  # the weights of the same built-in model
    else:  # another model, or one whose weights come with it
        name, value = "clip_model", loaded_id if clip_model is None else clip_model
    return ParameterError(
        name, value,
        f"loads CLIP {loaded_id} (weights {str(loaded['fingerprint'])[:_SHOWN]}...), but "
        f"{gate_file} was calibrated with {describe_clip(record)}: its thresholds hold for that "
        "model's scores only. Use that CLIP (loaded when no CLIP is chosen), or calibrate the "
        "run again with this one")


def templates_to_load(templates: Any, record: Mapping[str, Any] | None) -> Any:
    """The templates to build a run's class-text matrix with: ``templates`` when chosen, else the
    ones its gate recorded (a :class:`~hybridcls.zeroshot.prompts.TemplateSet` whose source,
    :data:`RECORDED_TEMPLATES`, messages name where a file would be), else None (the bundled
    default).

    Example:
        >>> recorded = templates_to_load(None, {"model_id": "m", "templates": ["a {}."]})
        >>> list(recorded), recorded.source
        (['a {}.'], '<templates recorded in gate.json>')
        >>> templates_to_load("t.txt", {"model_id": "m", "templates": ["a {}."]})
        't.txt'
    """
    if templates is not None or record is None or record.get("templates") is None:
        return templates
    return as_template_set([str(x) for x in record["templates"]], source=RECORDED_TEMPLATES)


def templates_difference(recorded: Sequence[str], loaded: Sequence[str]) -> str | None:
    """How ``loaded`` templates differ from ``recorded`` ones, for a message; None when they are
    the same templates in any order (the class-text matrix is their mean).

    Example:
        >>> templates_difference(["a {}.", "the {}."], ["the {}.", "a {}."]) is None
        True
        >>> templates_difference(["a {}."], ["a {}.", "my {}."])
        "'my {}.' is new"
    """
    if sorted(recorded) == sorted(loaded):
        return None
    new = [x for x in loaded if x not in recorded]
    gone = [x for x in recorded if x not in loaded]
    return (f"{new[0]!r} is new" if new else f"{gone[0]!r} is missing" if gone
            else "the same templates, some given more often")


def templates_mismatch(record: Mapping[str, Any] | None, loaded: Sequence[str], *, templates: Any,
                       gate_file: str | os.PathLike[str]) -> ParameterError | None:
    """Why a gate calibrated with ``record``'s templates cannot be used with ``loaded``, or None.

    Args:
        record: The gate's record (:func:`recorded_clip`); without ``templates`` nothing is checked.
        loaded: The templates the class-text matrix was built with.
        templates: The ``templates`` parameter as given (named in the message).
        gate_file: The ``gate.json`` the record is from.

    Returns:
        A :class:`~hybridcls.errors.ParameterError` naming ``templates``, the counts and a
        template that only one side has; None when they are the same templates in any order
        (the class-text matrix is their mean).
    """
    if record is None or record.get("templates") is None:
        return None
    recorded = [str(x) for x in record["templates"]]
    differs = templates_difference(recorded, loaded)
    if differs is None:
        return None
    shown = templates if isinstance(templates, (str, os.PathLike)) else f"<{len(loaded)} templates>"
    return ParameterError(
        "templates", str(shown),
        f"builds the class texts from {len(loaded)} templates, but {gate_file} was calibrated with "
        f"{len(recorded)} others ({differs}): its thresholds hold for the scores those give. "
        "Leave the templates unset to use the recorded ones, or calibrate the run again with these")
