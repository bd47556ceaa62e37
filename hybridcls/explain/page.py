"""The explanation page: one card per input, in input order, in one self-contained folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hybridcls.explain.explainer import ExplainResult, Explanation
from hybridcls.htmlpage import esc, figure, img, rel_link, table, write_page

__all__ = ["EXPLAIN_PAGE", "write_explain_page"]

EXPLAIN_PAGE = "index.html"

_METHODS = (
    '<p class="note"><b>Grad-CAM</b> (Selvaraju et al., ICCV 2017, computed by pytorch-grad-cam): '
    "where the supervised backbone's last stage holds evidence for the supervised branch's top "
    "class (gradient-weighted activations, positive part). <b>CLIP map</b>: cosine similarity of "
    "each location's image embedding to the class's text embedding (projected output tokens for "
    "a ViT; MaskCLIP's value path for a ResNet tower, Zhou et al., ECCV 2022). Both maps are "
    "scaled to [0, 1] per image: red = the image's most, blue = its least; they say where, not "
    "how much. Each is drawn over the crop its branch sees.</p>"
)


def _pairs(pairs: Any) -> list[tuple[str, str]]:
    return [(str(label), f"{100 * float(p):.1f}%") for label, p in pairs or []]


def _number(value: Any, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _decision_settings(gate: dict[str, Any]) -> str:
    """The support images, class lists and roll-up the decisions applied, as the intro says them."""
    parts = []
    support = gate.get("support")
    if support:
        counts = support.get("counts") or {}
        parts.append(f"{support.get('n_support', sum(counts.values()))} support images "
                     f"of {len(counts)} classes")
    restriction = gate.get("restriction")
    if restriction:
        if restriction.get("allowed_classes"):
            parts.append("classes allowed: " + ", ".join(map(str, restriction["allowed_classes"])))
        if restriction.get("site_classes"):
            parts.append(f"classes per input from {restriction['site_classes']}")
    rollup = gate.get("rollup")
    if rollup:
        chosen = (f" (chosen for precision {rollup['target']:g} on {rollup['n_images']} held-out "
                  "images)" if "target" in rollup else "")
        parts.append(f"roll-up threshold {rollup['threshold']:.4f}{chosen}")
    return "".join(f"; {p}" for p in parts)


def _card(ex: Explanation, n: int, out: Path) -> str:
    row = ex.row
    head = f"<h2>{n + 1}. {esc(row.path)}</h2>"
    if not ex.ok:
        return f'<div class="card">{head}<p class="error">could not be explained: {esc(row.error)}</p></div>'
    lines = [("prediction", row.label), ("probability", _number(row.score, ".4f"))]
    if "rank" in row.extra:  # roll-up on: the answer's rank (0: a class) and the class it came from
        lines.append(("rank (0 = a class, 1 = its parent...)", _number(row.extra["rank"], "d")))
        if row.extra["rank"]:  # a class answer (rank 0) came from itself
            lines.append(("rolled up from", row.extra["leaf"] or ""))
    if ex.n_allowed is not None:
        noun = "class" if ex.n_allowed == 1 else "classes"
        lines.append(("class list", f"restricted to {ex.n_allowed} {noun}"))
    lines += [
        ("decided by", row.branch),
        ("gate score (higher = less like the seen classes)", _number(row.extra.get("gate_score"), ".4f")),
        ("weight of the zero-shot branch", _number(row.extra.get("gate_weight"), ".3f")),
    ]
    decision = table(["decision", ""], lines)
    figs = [figure(rel_link(ex.files["input"], out), "input (supervised crop)")]
    if "gradcam" in ex.files:
        figs.append(figure(rel_link(ex.files["gradcam"], out),
                           f"Grad-CAM, supervised branch: {ex.gradcam_class}"))
    else:
        figs.append('<p class="note">no Grad-CAM: the class list allows no seen class, so the '
                    "supervised branch has no answer</p>")
    figs.append(figure(rel_link(ex.files["clip"], out),
                       f"CLIP map: {ex.clip_class} (cosine {ex.clip_cosine[0]:.3f} to "
                       f"{ex.clip_cosine[1]:.3f})"))
    tops = "".join(
        f'<div style="display:inline-block;margin-right:1em"><b>{esc(title)}</b>'
        f"{table(['class', 'probability'], _pairs(pairs), numeric=[1])}</div>"
        for title, pairs in (("final", row.topk), ("supervised branch", row.extra.get("supervised_topk")),
                             ("zero-shot branch" if ex.zeroshot_consulted
                              else "zero-shot branch (not used by the gate)",
                              row.extra.get("zeroshot_topk"))))
    parts = [head, decision, "<div>" + "".join(figs) + "</div>", tops]
    if ex.neighbours:
        cells = []
        for nb in ex.neighbours:
            pic = (img(rel_link(nb.thumbnail, out), nb.path, width=96) if nb.thumbnail is not None
                   else f'<span class="error">{esc(nb.error)}</span>')
            cells.append(f"<figure>{pic}<figcaption>{esc(nb.label)}<br>cos {nb.similarity:.3f}"
                         f"<br>{esc(Path(nb.path).name)}</figcaption></figure>")
        parts.append("<div><b>nearest training images</b><br>" + "".join(cells) + "</div>")
    return '<div class="card">' + "".join(parts) + "</div>"


def write_explain_page(result: ExplainResult, *, title: str = "hybridcls explain") -> Path:
    """Write ``index.html`` into the result's output folder, linking only files inside it.

    Example:
        >>> write_explain_page(explain_images(clf, ["photos/"], "explain-out"))  # doctest: +SKIP
        PosixPath('explain-out/index.html')
    """
    out = result.output
    n = len(result.explanations)
    gate = ", ".join(f"{k} {result.gate[k]}" for k in ("mode", "score", "method"))
    intro = (f"<p>{n} input(s), {result.n_errors} could not be explained. Run: {esc(result.run_dir)}; "
             f"gate: {esc(gate)}{esc(_decision_settings(result.gate))}. "
             f"{esc(result.index_note)}.</p>" + _METHODS)
    cards = [_card(ex, i, out) for i, ex in enumerate(result.explanations)]
    return write_page(out / EXPLAIN_PAGE, title, intro + "\n".join(cards))
