"""Few-shot support images: a folder of a few images per class, joined to a classifier at once.

``HybridClassifier(..., support=DIR)``, ``ZeroShotClassifier(..., support=DIR)``,
``clf.add_support(DIR)`` and ``hybridcls predict ... --support DIR``: no retraining.
This module is the model side: it reads the support images like training data
(:func:`hybridcls.data.scan_image_folder` and its decode check: an empty class
folder, an unreadable image or a class the prompts file does not name get the
same errors), matches class folders to prompts lines as training folders are
matched (:meth:`hybridcls.zeroshot.prompts.PromptSet.match`), runs them through
the classifier's own :class:`~hybridcls.engine.InferenceEngine`, and hands the
outputs to :meth:`hybridcls.gate.Gate.with_support`, which fits the
Tip-Adapter cache on the zero-shot logits (:mod:`hybridcls.gate.support`).

Both towers' outputs of every image it reads (support images, and a hybrid's
held-out seen images, which the fit and the threshold read) are cached by
content in the cache folder (``support/<key>.safetensors``, the key a hash of
the file's SHA-256 and the towers' weights fingerprints and precision): adding
images to a support folder runs the towers on the new ones only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hybridcls.cache import file_fingerprint, resolve_cache_dir, stable_hash
from hybridcls.data import Source, drop_unreadable, find_unreadable, scan_image_folder
from hybridcls.errors import (
    CheckpointError,
    DatasetError,
    HybridclsWarning,
    MissingDataWarning,
    ParameterError,
    PromptFileError,
    ResourceUseWarning,
)
from hybridcls.gate import BranchOutputs

if TYPE_CHECKING:
    from hybridcls.predictor import Predictor
    from hybridcls.zeroshot.prompts import PromptSet

__all__ = ["SUPPORT_CACHE_DIR", "add_support", "embed_cached", "refit_support", "support_parameter",
           "support_samples"]

#: The cache folder's subfolder of per-image tower outputs.
SUPPORT_CACHE_DIR = "support"
#: A folder, or ``(path, class name)`` pairs, or ``{class name: [paths]}``.
SupportSource = str | os.PathLike[str] | Sequence[tuple[str, str]] | Mapping[str, Sequence[str]]


def support_samples(source: SupportSource, prompts: PromptSet, *, workers: int = 0,
                    progress: bool = False) -> list[tuple[str, int]]:
    """The support images and their classes (positions in ``prompts``), every file decoded once.

    Args:
        source: An ImageFolder-style folder (one subfolder per class; one class is
            enough), ``(path, class name)`` pairs, or ``{class name: [paths]}``.
        prompts: The classifier's classes, in column order (``clf.tower_.prompts``).
        workers: Decoding processes for the check.
        progress: Show the check's progress bar.

    Returns:
        ``(path, class index)`` pairs, by class then walk order for a folder, in the
        given order otherwise.

    Raises:
        DatasetError: A missing folder, an empty or invalid class folder (as for training
            data), a class folder none of whose files decodes (its files listed), or any
            file that does not decode (named, with the reason).
        PromptFileError: A class that matches no line of the prompts file (names the folder
            or the class), or two that match the same line.
        ParameterError: A mapping's class with an empty list of images (named), or no image.
    """
    if isinstance(source, (str, os.PathLike)):
        index = scan_image_folder(source, role="support folder", min_classes=1, parameter="support")
        failed = find_unreadable([p for p, _ in index.samples], workers=workers, progress=progress,
                                 desc="checking support images")
        index = drop_unreadable(index, failed)  # a class with none readable: training's error
        named = [(os.path.join(index.root, name), name) for name in index.classes]
        labels = _match(named, prompts, "support class folder")
        samples = [(p, labels[y]) for p, y in index.samples]
    else:
        pairs = _pairs(source)
        if not pairs:
            raise ParameterError("support", source, "no support image given")
        names = sorted({c for _, c in pairs})
        labels = _match([(n, n) for n in names], prompts, "support class")
        samples = [(p, labels[names.index(c)]) for p, c in pairs]
        missing = [p for p, _ in samples if not os.path.isfile(p)]
        failed = {p: "file not found" for p in missing}
        failed.update(find_unreadable([p for p, _ in samples if p not in failed], workers=workers,
                                      progress=progress, desc="checking support images"))
    if failed:
        shown = "".join(f"\n  {p}: {reason}" for p, reason in list(failed.items())[:20])
        more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise DatasetError(f"{support_parameter(source)}: {len(failed)} support image(s) cannot be "
                           f"read (each one counts when there are a few per class):{shown}{more}\n"
                           "replace or remove them")
    if not samples:
        raise DatasetError(f"{support_parameter(source)}: no support image given")
    return samples


def _shown(source: Any) -> Any:
    """``source`` as an error shows it: a folder as its path, another value itself when short,
    else its type (``<list>``)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return source if len(repr(source)) <= 80 else f"<{type(source).__name__}>"


def support_parameter(source: Any) -> str:
    """``support='DIR'``: the parameter and its value, as messages about the support set
    start, so that the command line names its flag (``--support DIR``).

    Example:
        >>> support_parameter("data/support")
        "support='data/support'"
    """
    return f"support={_shown(source)!r}"


def _pairs(source: Any) -> list[tuple[str, str]]:
    """``(path, class name)`` pairs of a mapping ``{class: [paths]}`` or a sequence of pairs."""
    def malformed() -> ParameterError:
        return ParameterError("support", _shown(source), "expected a folder, a mapping {class "
                              "name: [image paths]} or a sequence of (image path, class name) pairs")

    if isinstance(source, Mapping):
        if not all(isinstance(v, (list, tuple)) for v in source.values()):
            raise malformed()
        empty = {str(c): [] for c, paths in source.items() if not paths}
        if empty:  # a class named without images is a mistake, not a class to drop
            raise ParameterError("support", empty, f"class(es) {', '.join(map(repr, empty))} "
                                 "given with no image: give their images or leave them out")
        return [(str(p), str(c)) for c, paths in source.items() for p in paths]
    if not isinstance(source, (list, tuple)) or not all(
            isinstance(pc, (list, tuple)) and len(pc) == 2 for pc in source):
        raise malformed()
    return [(str(p), str(c)) for p, c in source]


def _match(named: Sequence[tuple[str, str]], prompts: PromptSet, what: str) -> list[int]:
    """Each ``(shown, name)``'s prompts line, matched as training folders are."""
    taken: dict[int, str] = {}
    out = []
    for shown, name in named:
        i = prompts.match(name)
        if i is None:
            raise PromptFileError(prompts.source, None, f"{what} {shown!r} matches no line of the "
                                  "prompts file; add it (or a synonym after '|') to the prompts file")
        if i in taken:
            raise PromptFileError(prompts.source, prompts[i].line, f"{what}s {taken[i]!r} and "
                                  f"{shown!r} both match the line {prompts[i].name!r}")
        taken[i] = shown
        out.append(i)
    return out


def _tower_key(clf: Predictor) -> dict[str, Any]:
    """What a cached row depends on besides the image: the towers' weights and the precision."""
    supervised = clf._supervised_identity()
    return {"clip": clf.engine_.clip.bundle.fingerprint,
            "supervised": None if supervised is None else supervised["fingerprint"],
            "precision": clf.engine_.settings.precision}


def embed_cached(clf: Predictor, paths: Sequence[str], *, desc: str = "support"
                 ) -> tuple[BranchOutputs, int]:
    """Both towers' outputs of ``paths`` through ``clf``'s engine, read from the cache when there.

    Args:
        clf: A fitted classifier (its ``cache_dir`` holds the cache).
        paths: Image files (already checked to decode).
        desc: The progress bar's label.

    Returns:
        ``(outputs, encoded)``: the outputs in ``paths`` order, their zero-shot logits made
        from the embeddings with ``clf``'s class texts; ``encoded`` how many images the
        towers ran on (those not in the cache).

    Raises:
        DatasetError: An image that failed to decode after all.
    """
    folder = resolve_cache_dir(clf.engine_.settings.cache_dir) / SUPPORT_CACHE_DIR
    tower = _tower_key(clf)
    files = [folder / f"{stable_hash({**tower, 'sha256': _fingerprint(clf, p)})}.safetensors"
             for p in paths]
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    fresh: dict[int, BranchOutputs] = {}  # the images the towers ran on now, by position
    if todo:
        outputs, errors = clf.engine_.extract([Source(paths[i]) for i in todo], desc=desc)
        if errors:
            i, reason = next(iter(errors.items()))
            raise DatasetError(f"{paths[todo[i]]}: {reason}")
        assert outputs is not None
        for row, i in enumerate(todo):
            one = outputs.rows(slice(row, row + 1))
            # the zero-shot logits depend on the class texts: they are made again below
            fresh[i] = BranchOutputs(one.sup_logits, one.sup_features, None, one.clip_embeddings)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for i, one in fresh.items():
                one.save(files[i])
        except OSError as exc:
            # the outputs are at hand: an unwritable cache costs the next call a pass, not this one
            warnings.warn(f"could not write the support cache {folder}: {exc}", ResourceUseWarning,
                          stacklevel=2)
    out = BranchOutputs.concat([fresh[i] if i in fresh else BranchOutputs.load(f)
                                for i, f in enumerate(files)])
    with torch.no_grad():
        emb = torch.from_numpy(np.ascontiguousarray(out.clip_embeddings))
        out.clip_logits = clf.engine_.clip.logits_from_embeddings(emb).cpu().numpy()
    return out, len(todo)


def _held_out(clf: Predictor, support_paths: Sequence[str]
              ) -> tuple[BranchOutputs | None, np.ndarray | None]:
    """A hybrid's held-out seen images (outputs, seen-class indices) when its training folder is
    at hand; ``(None, None)`` for a zero-shot classifier, or (with a
    :class:`~hybridcls.errors.MissingDataWarning`) a run whose folder is not here.

    A held-out image with the content of a support image (one copied into the support
    folder) is left out, with a :class:`~hybridcls.errors.HybridclsWarning` naming both: it
    would find itself in the cache at affinity 1.
    """
    if getattr(clf, "checkpoint_config_", None) is None:  # zero-shot: no held-out seen images
        return None, None
    data_dir = clf._training_folder()
    if data_dir is None or not Path(data_dir).is_dir():
        where = ("records no training folder" if data_dir is None else "'s training folder is not "
                 f"here (looked for {' and '.join(clf._recorded_training_folders())})")
        warnings.warn(f"{clf.run_dir_}: the run{'' if data_dir else ' '}{where}, so the support "
                      "images are fitted without its held-out seen images (which set the gate's "
                      "threshold with them); give the folder where it is now with "
                      "calibrate(data_dir=DIR), which records it for later loads",
                      MissingDataWarning, stacklevel=2)
        return None, None
    val = clf._training_data(None).val
    support = {_fingerprint(clf, p): p for p in support_paths}
    copies = [(p, support[fp]) for p, _ in val if (fp := _fingerprint(clf, p)) in support]
    if copies:
        shown = "; ".join(f"{p} (= {twin})" for p, twin in copies[:10]) + (
            f"; ... and {len(copies) - 10} more" if len(copies) > 10 else "")
        warnings.warn(f"{len(copies)} held-out seen image(s) are also support images (the same "
                      f"content) and are left out of the support fit: {shown}", HybridclsWarning,
                      stacklevel=3)
        left = {p for p, _ in copies}
        val = [(p, y) for p, y in val if p not in left]
        if not val:
            return None, None
    outputs, _ = embed_cached(clf, [p for p, _ in val], desc="support: held-out")
    return outputs, np.array([y for _, y in val], dtype=np.int64)


def add_support(clf: Predictor, source: SupportSource, *, replace: bool = False) -> Predictor:
    """Join support images to ``clf`` (added to any given before) and refit its gate's adapter.

    See :meth:`hybridcls.predictor.Predictor.add_support`.
    """
    settings = clf.engine_.settings
    gate = getattr(clf, "gate_", None)
    if (not replace and not getattr(clf, "support_samples_", None)
            and getattr(gate, "support_", None) is not None):
        # a saved folder keeps the support images' embeddings, not the images: a refit
        # cannot read them again, and dropping them unasked would lose them
        raise ParameterError("replace", False, "this classifier's support images came with its "
                             "saved folder, which keeps their embeddings only: pass replace=True "
                             "to start a new support set (give the old images again to keep them)")
    new = support_samples(source, clf.engine_.clip.prompts, workers=settings.workers,
                          progress=settings.progress)
    known = [] if replace else list(getattr(clf, "support_samples_", []))
    clf.support_samples_ = _each_image_once(clf, known, new)
    return refit_support(clf)


def _each_image_once(clf: Predictor, known: Sequence[tuple[str, int]],
                     new: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The support images given before (``known``) and now (``new``), each image once: the first
    of the same path (however spelt) or the same content (SHA-256) is kept.

    An image in the cache twice would find itself at affinity 1 in the leave-one-out fit,
    which then measures nothing (``alpha`` grows without reason).

    Raises:
        ParameterError: An image given for two classes (the path, or the path of the first
            image of the same content, and both classes named).

    Warns:
        HybridclsWarning: Names the images given more than once, which are kept once; not an
            image given before under the same path (a support folder given again after images
            were added to it, the documented way to add them).
    """
    kept: list[tuple[str, int]] = []
    first: dict[str, tuple[str, int]] = {}  # a path or a content key -> the first (path, label)
    repeated: list[str] = []
    for i, (path, label) in enumerate([*known, *new]):
        where = os.path.normcase(os.path.abspath(path))
        content = f"sha256:{_fingerprint(clf, path)}"
        by_path = first.get(where)
        seen = by_path or first.get(content)
        if seen is None:
            first[where] = first[content] = (path, label)
            kept.append((path, label))
            continue
        same = ("given again" if seen[0] == path else f"is the file {seen[0]}" if by_path
                else f"has the same content as {seen[0]}")
        if seen[1] != label:
            raise ParameterError("support", path, f"{same} and is given for "
                                 f"{clf.classes_[label]!r} as well as {clf.classes_[seen[1]]!r}: "
                                 "an image is support for one class")
        if i >= len(known) and by_path is not None and seen in known:  # however the path is spelt
            # a folder given again after images were added to it: the ones given before stay
            continue
        repeated.append(f"{path} ({same})")
    if repeated:
        shown = "; ".join(repeated[:10]) + (f"; ... and {len(repeated) - 10} more"
                                             if len(repeated) > 10 else "")
        warnings.warn(f"{len(repeated)} support image(s) given more than once are used once: "
                      f"{shown}", HybridclsWarning, stacklevel=3)
    return kept


def _fingerprint(clf: Predictor, path: str) -> str:
    """The SHA-256 of an image file, as the support cache keys it (remembered per process)."""
    return file_fingerprint(path, cache_dir=clf.engine_.settings.cache_dir)


def refit_support(clf: Predictor) -> Predictor:
    """Fit ``clf``'s gate to its ``support_samples_`` again (after a new calibration)."""
    samples = getattr(clf, "support_samples_", [])
    if not samples:
        return clf
    gate = getattr(clf, "gate_", None)
    if gate is None:
        raise CheckpointError("support images need a calibrated gate: calibrate the run first "
                              "with HybridClassifier.calibrate()")
    support, encoded = embed_cached(clf, [p for p, _ in samples])
    held_out, y_held_out = _held_out(clf, [p for p, _ in samples])
    clf.support_encoded_ = encoded
    clf.gate_ = gate.with_support(support, [y for _, y in samples],
                                  class_names=[str(c) for c in clf.classes_],
                                  held_out=held_out, y_held_out=y_held_out)
    return clf
