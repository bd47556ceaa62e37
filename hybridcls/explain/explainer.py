"""Explain a hybrid's predictions image by image: maps, decision, nearest training images.

For every input, in input order (a file that cannot be decoded keeps its
place, with its error):

1. the decision: the row :meth:`HybridClassifier.batch_rows` makes (label,
   branch, gate score and weight, both branches' top-k; with roll-up, the
   answer's rank and the class it came from), with CLIP run on every image
   so that both branches' top-k exist; the classifier's support images,
   class lists (``allowed_classes``, ``site_classes``) and roll-up apply as
   they do in ``hybridcls predict``;
2. Grad-CAM of the supervised branch for its own top-1 class
   (:mod:`hybridcls.explain.gradcam`), over the crop that branch sees (none
   where a class list allows no seen class: that branch has no answer);
3. the CLIP similarity map for the predicted class (the class a rolled-up
   answer came from; the zero-shot top-1 when the answer is ``unknown``;
   :mod:`hybridcls.explain.clip_maps`), over the crop the CLIP tower sees;
4. its nearest training images in the run's CLIP embedding index
   (``index/clip.*``, :mod:`hybridcls.index`), when the run has one.

Each map is written as a PNG overlay; :mod:`hybridcls.explain.page` turns
the result into one HTML page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from hybridcls.data import Source, as_sources, load_image
from hybridcls.errors import ImageDecodeError, ParameterError
from hybridcls.explain.clip_maps import clip_similarity_map
from hybridcls.explain.gradcam import gradcam_maps, require_grad_cam
from hybridcls.explain.overlay import overlay, save_png, thumbnail
from hybridcls.outputs import PredictionRow, check_topk, topk_pairs

if TYPE_CHECKING:
    from hybridcls.hybrid import HybridClassifier

__all__ = ["ExplainResult", "Explanation", "Neighbour", "explain_images"]

IMAGES_DIR = "images"
NEIGHBOURS_DIR = "neighbours"
#: Nearest training images per input when none is asked for (fewer when the index holds fewer).
DEFAULT_NEIGHBOURS = 5


@dataclass
class Neighbour:
    """One nearest training image: its path, class, cosine similarity and thumbnail (None if unreadable)."""

    path: str
    label: str
    similarity: float
    thumbnail: Path | None = None
    error: str = ""


@dataclass
class Explanation:
    """Everything shown for one input.

    Attributes:
        row: The prediction (or error) row, as ``hybridcls predict`` writes it.
        gradcam: ``[H, W]`` Grad-CAM in [0, 1] over the supervised crop (None on error, or
            where the input's class list allows no seen class).
        gradcam_class: The seen class Grad-CAM explains (the supervised top-1; ``""``: none).
        clip_map: ``[H, W]`` similarity map in [0, 1] over the CLIP crop (None on error).
        clip_class: The class whose text embedding the map compares to.
        clip_cosine: ``(min, max)`` raw cosine similarity on the feature grid.
        files: ``"input"``, ``"gradcam"``, ``"clip"`` -> the PNG written.
        neighbours: Nearest training images, most similar first.
        zeroshot_consulted: False when the gate did not use the zero-shot branch
            (hard routing to the supervised branch); its top-k is shown all the same.
        n_allowed: How many classes the input's class list allows (None: no class list).
    """

    row: PredictionRow
    gradcam: np.ndarray | None = None
    gradcam_class: str = ""
    clip_map: np.ndarray | None = None
    clip_class: str = ""
    clip_cosine: tuple[float, float] = (float("nan"), float("nan"))
    files: dict[str, Path] = field(default_factory=dict)
    neighbours: list[Neighbour] = field(default_factory=list)
    zeroshot_consulted: bool = True
    n_allowed: int | None = None

    @property
    def ok(self) -> bool:
        return self.row.status == "ok"


@dataclass
class ExplainResult:
    """The explanations, in input order, and what the page says about the run.

    Attributes:
        explanations: One per input, in order.
        output: The folder written.
        run_dir: The run directory the classifier was loaded from.
        gate: The decision's settings: ``mode``, ``score``, ``method``, and when set
            ``rollup`` (:meth:`hybridcls.hierarchy.Rollup.summary`), ``support`` (how many
            support images) and ``restriction`` (the class lists), as ``gate_summary()``
            gives them.
        index_note: What the page says about the nearest training images.
    """

    explanations: list[Explanation]
    output: Path
    run_dir: str
    gate: dict[str, Any]
    index_note: str

    @property
    def n_errors(self) -> int:
        return sum(not e.ok for e in self.explanations)


def _class_index(classes: np.ndarray, name: str) -> int:
    return int(np.flatnonzero(classes == name)[0])


class _Views:
    """Each tower's input tensor and the crop it sees, from one decoded image (the engine's views)."""

    def __init__(self, clf: HybridClassifier) -> None:
        self.sup, self.clip = clf.engine_.views

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, Image.Image, torch.Tensor, Image.Image]:
        # each tower's geometry runs once; its tensor is that crop normalised (as in the engine)
        sup_px, clip_px = self.sup.pixels(image), self.clip.pixels(image)
        return (self.sup.normalise(sup_px), TF.to_pil_image(sup_px),
                self.clip.normalise(clip_px), TF.to_pil_image(clip_px))


def _neighbours(index: Any, sims: np.ndarray, ids: np.ndarray, classes: np.ndarray, out: Path,
                cache: dict[int, Neighbour]) -> list[Neighbour]:
    """One image's nearest training images, from its row of a batched index search."""
    found = []
    for sim, i in zip(sims, ids):
        if i < 0 or not np.isfinite(sim):
            continue
        i = int(i)
        if i not in cache:
            label = int(index.labels[i])
            nb = Neighbour(path=index.paths[i], similarity=float(sim),
                           label=str(classes[label]) if 0 <= label < len(classes) else "")
            try:
                nb.thumbnail = save_png(thumbnail(load_image(nb.path, target_side=96), side=96),
                                        out / NEIGHBOURS_DIR / f"{i:07d}.png")
            except ImageDecodeError as err:
                nb.error = err.reason
            cache[i] = nb
        found.append(replace(cache[i], similarity=float(sim)))
    return found


def explain_images(clf: HybridClassifier, inputs: Any, output: str | os.PathLike[str], *, topk: int | None = None,
                   neighbours: int | None = None, progress: bool = False) -> ExplainResult:
    """Explain a calibrated :class:`~hybridcls.hybrid.HybridClassifier`'s predictions.

    Args:
        clf: A loaded, calibrated hybrid (``load_run`` or ``from_pretrained``).
        inputs: Files, folders, globs, list files or :class:`~hybridcls.data.Source` items.
        output: Folder for the PNGs (``images/``, ``neighbours/``); the page goes there too.
        topk: Classes listed per branch: 1 to ``len(clf.classes_)``; None:
            :data:`~hybridcls.outputs.DEFAULT_TOPK`, or every class when there are fewer.
        neighbours: Nearest training images per input (0: none), at most as many as the run's
            embedding index holds; None: :data:`DEFAULT_NEIGHBOURS`, or every indexed image when
            there are fewer.
        progress: Show a progress bar.

    Returns:
        An :class:`ExplainResult`: one :class:`Explanation` per input, in order.

    Raises:
        MissingExtraError: grad-cam (the ``[explain]`` extra) is not installed.
        CheckpointError: The run has no gate (not calibrated).
        ParameterError: ``topk`` out of range, or ``neighbours`` beyond the index.

    Example:
        >>> clf = HybridClassifier(prompts="prompts.txt").load_run("runs/seen40")  # doctest: +SKIP
        >>> res = explain_images(clf, ["photos/"], "explain-out")  # doctest: +SKIP
        >>> write_explain_page(res)  # doctest: +SKIP
    """
    require_grad_cam()
    topk = check_topk(topk, len(clf.classes_))
    out = Path(output)
    sources: list[Source] = as_sources(inputs)
    views = _Views(clf)
    classes = np.asarray(clf.classes_, dtype=object)
    seen = classes[: clf.n_seen_]
    class_names = set(classes.tolist())
    gate = clf.gate_
    asked = neighbours
    if neighbours is None:  # the default shrinks to a small index; a number given does not
        neighbours = DEFAULT_NEIGHBOURS
    index = gate.clip_index_ if neighbours > 0 and gate is not None else None
    if asked is None and index is not None:
        neighbours = min(neighbours, index.ntotal)
    if neighbours <= 0:
        note = "nearest training images not asked for (neighbours=0)"
    elif index is None:
        note = (f"no nearest training images: {gate.index_error_}"
                if gate is not None and gate.index_error_ is not None
                else "no nearest training images: the run has no embedding index "
                     "(run `hybridcls calibrate` to build index/clip.*)")
    elif neighbours > index.ntotal:
        raise ParameterError("neighbours", neighbours, f"more than the {index.ntotal} training images "
                             f"the run's embedding index holds; give 0 to {index.ntotal}")
    else:
        note = f"nearest training images: cosine similarity of CLIP embeddings, {index.ntotal} indexed"
    thumbs: dict[int, Neighbour] = {}
    explanations: list[Explanation] = []
    text = clf.tower_.text_features
    visual = clf.tower_.bundle.model.visual
    paths = [s.path for s in sources]
    # as predict applies them: the roll-up's threshold is chosen once, the class lists per input
    rollup = clf.prediction_rollup()
    allowed = clf.allowed_mask(sources)
    for batch, res in clf.iter_predictions(sources, progress=progress, clip="all"):
        rows = clf.batch_rows(paths, batch, res, topk=topk, rollup=rollup)
        ok_allowed = None if allowed is None else allowed[batch.ok]
        zs_probs = None
        pos = {idx: j for j, idx in enumerate(batch.ok)}
        todo: list[tuple[Explanation, int, int, Image.Image, Image.Image]] = []
        sup_x, clip_x, sup_t, clip_t = [], [], [], []
        for idx, row in zip(batch.indices, rows):
            ex = Explanation(row=row, n_allowed=None if allowed is None else int(allowed[idx].sum()))
            explanations.append(ex)
            if not ex.ok:
                continue
            try:
                # decoded as the engine decoded it (the same reduced scale): the maps and the
                # decision come from the same pixels
                s_x, s_crop, c_x, c_crop = views(clf.engine_.load(sources[idx]))
            except ImageDecodeError as err:  # changed on disk since the engine read it
                ex.row = PredictionRow.failed(row.path, err.reason)
                continue
            # no supervised top-k: the input's class list allows no seen class
            sup_top = row.extra["supervised_topk"][0][0] if row.extra["supervised_topk"] else None
            ex.gradcam_class = "" if sup_top is None else str(sup_top)
            if not row.extra["zeroshot_topk"]:
                # A hard gate keeps the supervised answer and leaves the zero-shot one out of the
                # row; CLIP ran on every image here, so show what it would have said (its
                # support images and the input's class list applied, as where the gate uses it).
                if zs_probs is None:  # once per batch, for the rows that need it
                    zs_probs = clf.gate_.zeroshot_probs(batch.outputs, allowed=ok_allowed)
                row.extra["zeroshot_topk"] = topk_pairs(zs_probs[pos[idx]], classes, topk)
                ex.zeroshot_consulted = False
            zs_top = row.extra["zeroshot_topk"][0][0]
            # the class a rolled-up answer came from: an ancestor has no text embedding
            answer = row.extra["leaf"] if row.extra.get("rank") else row.label
            ex.clip_class = answer if answer in class_names else str(zs_top)
            if sup_top is not None:
                sup_x.append(s_x)
                sup_t.append(_class_index(seen, sup_top))
            clip_x.append(c_x)
            clip_t.append(_class_index(classes, ex.clip_class))
            todo.append((ex, idx, pos[idx], s_crop, c_crop))
        if not todo:
            continue
        cams = iter(gradcam_maps(clf.supervised_, torch.stack(sup_x), sup_t) if sup_x else [])
        maps, cosine = clip_similarity_map(visual, torch.stack(clip_x).to(text.device),
                                           text[:, clip_t].T)
        maps, cosine = maps.cpu().numpy(), cosine.cpu().numpy()
        if index is not None:  # one search for the batch
            nb_sims, nb_ids = index.search(batch.outputs.clip_embeddings[[j for _, _, j, _, _ in todo]],
                                           neighbours)
        for n, (ex, idx, j, s_crop, c_crop) in enumerate(todo):
            stem = f"{idx:05d}"  # the input's position: unique, and sorts in input order
            ex.clip_map = maps[n]
            ex.clip_cosine = (float(cosine[n].min()), float(cosine[n].max()))
            ex.files = {
                "input": save_png(thumbnail(s_crop), out / IMAGES_DIR / f"{stem}_input.png"),
                "clip": save_png(overlay(c_crop, maps[n]), out / IMAGES_DIR / f"{stem}_clip.png"),
            }
            if ex.gradcam_class:  # the maps of the inputs with a supervised top-1, in order
                ex.gradcam = next(cams)
                ex.files["gradcam"] = save_png(overlay(s_crop, ex.gradcam),
                                               out / IMAGES_DIR / f"{stem}_gradcam.png")
            if index is not None:
                ex.neighbours = _neighbours(index, nb_sims[n], nb_ids[n], seen, out, thumbs)
    cal = clf.gate_.calibration_
    summary = clf.gate_summary() or {}
    decision = {"mode": clf.mode or cal.mode, "score": cal.score, "method": cal.method,
                **{key: summary[key] for key in ("rollup", "support", "restriction") if key in summary}}
    return ExplainResult(explanations, out, str(clf.run_dir_), decision, note)
