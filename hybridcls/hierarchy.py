"""Roll-up to a coarser label when unsure: the class tree of a prompts file, and its rule.

A prompts-file line may end with the class's ancestors, nearest first
(``red fox: a small orange canid | fox > canid > carnivore > mammal``;
:mod:`hybridcls.zeroshot.prompts` parses them). :class:`Hierarchy` holds that
tree over the classifier's classes; :func:`rollup` applies the rule to fused
probabilities; :func:`calibrate_threshold` picks the threshold on labelled
held-out images at a target precision; :func:`rollup_figures` scores answers
at every rank. Arrays only: no model, no file.

The rule (the hierarchical-softmax "roll-up" of camera-trap tools): a row
whose best class has probability at least the threshold is answered with that
class (rank 0). Otherwise each ancestor's probability is the sum of its
classes' (the mass "up the tree"), and the row is answered with the deepest
ancestor (farthest from its root) whose mass reaches the threshold, the
larger mass breaking a tie; its rank is its place in the chain of its most
probable class (1 = parent, 2 = grandparent, ...), and that class is the row's
``leaf``. When no ancestor reaches the threshold either (the classes of the
row's mass have no common root, or a class without ancestors holds it), the
row keeps its best class: roll-up never answers with nothing.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hybridcls.errors import DataTooSmallError, ParameterError
from hybridcls.zeroshot.prompts import PromptSet, normalize_label

__all__ = [
    "Hierarchy",
    "Rollup",
    "RollupCalibration",
    "RollupFigures",
    "RollupResult",
    "calibrate_threshold",
    "check_threshold",
    "correct_at_rank",
    "rollup",
    "rollup_figures",
    "threshold_candidates",
]

# Candidate thresholds the precision search evaluates at most (quantiles of the distinct ones).
_MAX_CANDIDATES = 2000
# An ancestor's mass is a float sum (0.3 + 0.3 + 0.3 = 0.8999999999999999): it reaches a threshold
# within this much of it.
_SUM_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Hierarchy:
    """The classes and the ancestors above them.

    Attributes:
        classes: The class names, in the columns' order of the probabilities.
        nodes: Every ancestor's name (first spelling met), in order of first appearance.
        chains: Per class, the indices into :attr:`nodes` of its ancestors, nearest first
            (empty for a class without ancestors).
        parents: Per node, the index of its parent node, -1 for a root.
    """

    classes: tuple[str, ...]
    nodes: tuple[str, ...]
    chains: tuple[tuple[int, ...], ...]
    parents: tuple[int, ...]

    @classmethod
    def from_prompts(cls, prompts: PromptSet) -> Hierarchy:
        """The tree a parsed prompts file gives (its classes in its order; parsing checked it).

        Example:
            >>> from hybridcls.zeroshot.prompts import parse_prompts
            >>> h = Hierarchy.from_prompts(parse_prompts("fox > canid > mammal\\nwolf > canid > mammal\\ncod"))
            >>> h.nodes, h.chains, h.parents
            (('canid', 'mammal'), ((0, 1), (0, 1), ()), (1, -1))
        """
        index: dict[str, int] = {}
        nodes: list[str] = []
        parents: list[int] = []
        chains: list[tuple[int, ...]] = []
        for cp in prompts:
            chain = []
            for anc in cp.ancestors:
                key = normalize_label(anc)
                if key not in index:
                    index[key] = len(nodes)
                    nodes.append(anc)
                    parents.append(-1)
                chain.append(index[key])
            for child, parent in itertools.pairwise(chain):
                parents[child] = parent
            chains.append(tuple(chain))
        return cls(tuple(prompts.names), tuple(nodes), tuple(chains), tuple(parents))

    # Built once per tree (the tree is frozen): roll-up reads them for every batch.
    @functools.cached_property
    def membership(self) -> np.ndarray:
        """``[C, A]`` float: 1 where node ``a`` is an ancestor of class ``c`` (read-only)."""
        m = np.zeros((len(self.classes), len(self.nodes)), np.float64)
        for c, chain in enumerate(self.chains):
            m[c, list(chain)] = 1.0
        m.flags.writeable = False
        return m

    @functools.cached_property
    def depth(self) -> np.ndarray:
        """``[A]`` int: each node's distance from its root (a root is 0; read-only)."""
        depth = np.zeros(len(self.nodes), np.int64)
        for chain in self.chains:
            for i, node in enumerate(chain):
                depth[node] = len(chain) - 1 - i
        depth.flags.writeable = False
        return depth

    @functools.cached_property
    def _positions(self) -> tuple[dict[str, int], dict[str, int]]:
        """Normalised class and node names -> their first position."""
        def first(names: Sequence[str]) -> dict[str, int]:
            out: dict[str, int] = {}
            for i, n in enumerate(names):
                out.setdefault(normalize_label(n), i)
            return out
        return first(self.classes), first(self.nodes)

    @property
    def max_rank(self) -> int:
        """The longest chain's length: ranks run from 0 (a class) to this."""
        return max((len(c) for c in self.chains), default=0)

    def class_index(self, name: str) -> int | None:
        """Position of the class ``name`` (compared after normalisation), None if none."""
        return self._positions[0].get(normalize_label(name))

    def node_index(self, name: str) -> int | None:
        """Position of the ancestor ``name`` (compared after normalisation), None if none."""
        return self._positions[1].get(normalize_label(name))

    def at_rank(self, leaf: np.ndarray, rank: int) -> np.ndarray:
        """``[N]`` int: what each class of ``leaf`` is at ``rank``: the class itself at 0, else
        the node index of its ancestor there; -1 where its chain is shorter or ``leaf`` is -1.

        Classes and nodes share no index space: compare at one rank only.
        """
        leaf = np.asarray(leaf, np.int64)
        if rank == 0:
            return leaf.copy()
        table = np.array([c[rank - 1] if len(c) >= rank else -1 for c in self.chains] + [-1], np.int64)
        return table[leaf]  # leaf -1 reads the trailing -1


def check_threshold(threshold: float, parameter: str = "rollup_threshold") -> float:
    """``threshold`` as a float in (0, 1]; a probability the best class must reach.

    Raises:
        ParameterError: Not a number in (0, 1] (names ``parameter``).
    """
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ParameterError(parameter, threshold, "expected a probability in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        meaning = ("the share of answers right at their rank that the threshold must reach"
                   if parameter == "rollup_precision" else
                   "the probability below which the best class is rolled up")
        raise ParameterError(parameter, threshold, f"expected a probability in (0, 1]: {meaning}")
    return value


@dataclass
class RollupResult:
    """The roll-up of ``N`` rows.

    Attributes:
        answer: ``[N]`` object: the class or ancestor name answered.
        rank: ``[N]`` int: 0 for a class, 1 for its parent, 2 for a grandparent...
        leaf: ``[N]`` int: the class the answer came from (index into :attr:`Hierarchy.classes`).
        node: ``[N]`` int: the answered ancestor's index into :attr:`Hierarchy.nodes`, -1 for a class.
        score: ``[N]`` float: the answer's probability (the class's, or the ancestor's mass).
    """

    answer: np.ndarray
    rank: np.ndarray
    leaf: np.ndarray
    node: np.ndarray
    score: np.ndarray

    @property
    def rolled_up(self) -> np.ndarray:
        """``[N]`` bool: rows answered with an ancestor."""
        return self.rank > 0


def rollup(probs: Any, hierarchy: Hierarchy, threshold: float | Any) -> RollupResult:
    """Answer each row with its best class, or with the deepest ancestor sure enough.

    Args:
        probs: ``[N, C]`` probabilities over :attr:`Hierarchy.classes` (each row sums to 1).
        hierarchy: The classes' tree.
        threshold: In (0, 1]: a row whose best class's probability is below it is rolled
            up to the deepest ancestor whose summed probability reaches it (the module's rule);
            or ``[N]`` such thresholds, one per row.

    Returns:
        One answer per row.

    Raises:
        ParameterError: ``threshold`` outside (0, 1], or ``probs`` not ``[N, C]``.

    Example:
        >>> from hybridcls.zeroshot.prompts import parse_prompts
        >>> h = Hierarchy.from_prompts(parse_prompts("fox > canid\\nwolf > canid\\ncod"))
        >>> r = rollup([[0.5, 0.4, 0.1], [0.9, 0.05, 0.05]], h, 0.8)
        >>> r.answer.tolist(), r.rank.tolist(), r.leaf.tolist()
        (['canid', 'fox'], [1, 0], [0, 0])
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[1] != len(hierarchy.classes):
        raise ParameterError("probs", f"shape {p.shape}",
                             f"expected [N, {len(hierarchy.classes)}]: one column per class")
    n = len(p)
    if np.ndim(threshold) == 0:
        threshold = check_threshold(threshold)
    else:
        threshold = np.asarray(threshold, np.float64)
        if threshold.shape != (n,) or not np.all((threshold > 0) & (threshold <= 1)):
            raise ParameterError("threshold", f"an array of shape {threshold.shape}",
                                 f"expected one probability in (0, 1] per row ({n})")
    top = p.argmax(axis=1) if p.shape[1] else np.zeros(n, np.int64)
    rows = np.arange(n)
    member = hierarchy.membership
    mass = p @ member  # [N, A]: each ancestor's probability
    t = np.broadcast_to(threshold, (n,))
    reach = mass >= t[:, None] - _SUM_TOLERANCE
    # deepest first, then the larger mass: depth is an integer and mass at most 1
    key = np.where(reach, hierarchy.depth[None, :] + 0.5 * mass, -np.inf)
    rolled = (p[rows, top] < t) & reach.any(axis=1)
    node = np.where(rolled, key.argmax(axis=1) if member.shape[1] else -1, -1)
    leaf = top.copy()
    if rolled.any():
        under = p[rolled] * member[:, node[rolled]].T  # only the classes below the answer
        leaf[rolled] = under.argmax(axis=1)
    rank = np.zeros(n, np.int64)
    for i in np.flatnonzero(rolled):
        rank[i] = hierarchy.chains[leaf[i]].index(node[i]) + 1
    names = np.array(list(hierarchy.classes), dtype=object)
    nodes = np.array(list(hierarchy.nodes) + [""], dtype=object)
    answer = np.where(rolled, nodes[node], names[leaf]) if n else np.empty(0, dtype=object)
    score = np.where(rolled, mass[rows, np.maximum(node, 0)] if member.shape[1] else 0.0,
                     p[rows, top])
    return RollupResult(answer.astype(object), rank, leaf, node, score)


@dataclass(frozen=True)
class Rollup:
    """Roll-up as predictions apply it: a tree and a threshold (see :func:`rollup`).

    Attributes:
        hierarchy: The classes' tree.
        threshold: The threshold applied.
        calibration: How the threshold was chosen at a target precision
            (:func:`calibrate_threshold`); ``None`` for a threshold given as it is.
    """

    hierarchy: Hierarchy
    threshold: float
    calibration: RollupCalibration | None = None

    def apply(self, probs: Any) -> RollupResult:
        return rollup(probs, self.hierarchy, self.threshold)

    def summary(self) -> dict[str, Any]:
        """What a run record keeps of it: ``{"threshold"}``, and for a threshold chosen at a target
        precision the :class:`RollupCalibration` (``target``, the held-out ``precision`` reached,
        ``leaf_share``, ``n_images``), so that a reader knows which threshold made the rows."""
        return {"threshold": self.threshold} if self.calibration is None else asdict(self.calibration)


@dataclass(frozen=True)
class RollupCalibration:
    """A threshold chosen at a target precision (:func:`calibrate_threshold`).

    Attributes:
        threshold: The smallest threshold whose answers reach the target.
        precision: The share of answers correct at their rank, at that threshold.
        leaf_share: The share of rows still answered with a class.
        target: The precision asked for.
        n_images: How many labelled images it was chosen on.
    """

    threshold: float
    precision: float
    leaf_share: float
    target: float
    n_images: int


def correct_at_rank(res: RollupResult, labels: Any, member: np.ndarray) -> np.ndarray:
    """``[N]`` bool: the answer is the true class (``labels``, ``[N]`` class indices), or (rolled
    up) one of its ancestors; ``member`` is :attr:`Hierarchy.membership`."""
    labels = np.asarray(labels, np.int64)
    leaf_ok = res.leaf == labels
    node_ok = member[labels, np.maximum(res.node, 0)] > 0 if member.shape[1] else np.zeros(len(labels), bool)
    return np.where(res.node >= 0, node_ok, leaf_ok)


def threshold_candidates(probs: Any, hierarchy: Hierarchy) -> np.ndarray:
    """The thresholds at which :func:`rollup`'s answers to ``probs`` can change, ascending.

    The answers change only where the threshold crosses a row's best-class probability or
    an ancestor's mass, so those values (and 1) are the candidates, thinned to evenly spaced
    quantiles when there are more than 2,000 of them.

    Args:
        probs: ``[N, C]`` probabilities over :attr:`Hierarchy.classes`.
        hierarchy: The classes' tree.

    Returns:
        ``[K]`` thresholds in (0, 1].
    """
    p = np.asarray(probs, np.float64)
    values = np.unique(np.concatenate([p.max(axis=1) if p.size else [], (p @ hierarchy.membership).ravel(),
                                       [1.0]]))
    values = values[(values > 0) & (values <= 1)]
    if len(values) > _MAX_CANDIDATES:
        values = np.unique(np.quantile(values, np.linspace(0, 1, _MAX_CANDIDATES)))
    return values


def calibrate_threshold(probs: Any, labels: Any, hierarchy: Hierarchy, precision: float
                        ) -> RollupCalibration:
    """The smallest roll-up threshold whose answers are correct at their rank at least ``precision``
    of the time, on labelled images (held-out seen images: none of them trained the model).

    The candidates are :func:`threshold_candidates`; the smallest that reaches the target
    keeps the most answers at class level.

    Args:
        probs: ``[N, C]`` fused probabilities of the labelled images.
        labels: ``[N]`` their true class indices into :attr:`Hierarchy.classes`.
        hierarchy: The classes' tree.
        precision: The target, in (0, 1].

    Raises:
        ParameterError: ``precision`` outside (0, 1], or no threshold reaches it (names the best
            precision any threshold reaches).
        DataTooSmallError: No labelled image.

    Example:
        >>> from hybridcls.zeroshot.prompts import parse_prompts
        >>> h = Hierarchy.from_prompts(parse_prompts("fox > canid\\nwolf > canid\\ncod"))
        >>> probs = [[0.9, 0.05, 0.05], [0.45, 0.5, 0.05], [0.1, 0.1, 0.8]]
        >>> calibrate_threshold(probs, [0, 0, 2], h, 1.0).threshold  # 0.5 < t <= 0.8 ok; t = 0.8
        0.8
    """
    target = check_threshold(precision, "rollup_precision")
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    if len(p) == 0:
        raise DataTooSmallError("rollup_precision: no labelled image to choose the roll-up threshold "
                                "on; set the threshold yourself (rollup_threshold=T)")
    member = hierarchy.membership
    best = (-1.0, 0.0)
    for t in threshold_candidates(p, hierarchy):
        res = rollup(p, hierarchy, float(t))
        share = float(correct_at_rank(res, y, member).mean())
        if share >= target:
            return RollupCalibration(float(t), share, float((res.rank == 0).mean()), target, len(p))
        best = max(best, (share, float(t)))
    raise ParameterError("rollup_precision", precision,
                         f"no roll-up threshold reaches it on {len(p)} labelled images (the best is "
                         f"{best[0]:.4f}, at {best[1]:.4g}); ask for less, or give the classes "
                         "a common root ancestor")


@dataclass(frozen=True)
class RollupFigures:
    """How roll-up answers score against true classes (:func:`rollup_figures`).

    Attributes:
        accuracy_at_rank: For ranks 0 (classes) to the longest chain: the share of images
            answered at that rank or finer whose answer, read at that rank, is the true
            class's (at rank 0 the class itself).
        n_images: Images scored.
        n_rolled_up: Images answered with an ancestor.
        n_rolled_up_correct: Of those, the answers that are an ancestor of the true class.
        n_wrong: Images whose answer is wrong at its own rank (a wrong class, a wrong
            ancestor, or no answer).
        leaf_share: The share of images answered with a class.
    """

    accuracy_at_rank: tuple[float, ...]
    n_images: int
    n_rolled_up: int
    n_rolled_up_correct: int
    n_wrong: int
    leaf_share: float

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy_at_rank": list(self.accuracy_at_rank), "n_images": self.n_images,
                "n_rolled_up": self.n_rolled_up, "n_rolled_up_correct": self.n_rolled_up_correct,
                "n_wrong": self.n_wrong, "leaf_share": self.leaf_share}


def rollup_figures(true_leaf: Any, leaf: Any, rank: Any, hierarchy: Hierarchy) -> RollupFigures:
    """Score answers given as (the class each came from, its rank) against the true classes.

    Args:
        true_leaf: ``[N]`` true class indices into :attr:`Hierarchy.classes`.
        leaf: ``[N]`` the class each answer came from; -1 for no answer (an error row,
            ``unknown``), which is wrong at every rank.
        rank: ``[N]`` each answer's rank (0: the class itself).
        hierarchy: The classes' tree.

    Example:
        >>> from hybridcls.zeroshot.prompts import parse_prompts
        >>> h = Hierarchy.from_prompts(parse_prompts("fox > canid\\nwolf > canid\\ncod"))
        >>> f = rollup_figures([0, 1, 2, 0], [0, 0, 2, 1], [0, 1, 0, 0], h)
        >>> f.accuracy_at_rank, f.n_rolled_up, f.n_rolled_up_correct, f.n_wrong
        ((0.5, 0.75), 1, 1, 1)
    """
    y = np.asarray(true_leaf, np.int64)
    leaf = np.asarray(leaf, np.int64)
    rank = np.asarray(rank, np.int64)
    answered = leaf >= 0
    accuracy = []
    for r in range(hierarchy.max_rank + 1):
        truth, said = hierarchy.at_rank(y, r), hierarchy.at_rank(leaf, r)
        ok = answered & (rank <= r) & (said >= 0) & (said == truth)
        accuracy.append(float(ok.mean()) if len(y) else float("nan"))
    # the answered node (-1 for a class): the rank-th ancestor of the class it came from
    node = np.array([hierarchy.chains[c][r - 1] if c >= 0 and 0 < r <= len(hierarchy.chains[c]) else -1
                     for c, r in zip(leaf, rank)], np.int64)
    res = RollupResult(np.empty(len(y), object), rank, leaf, node, np.zeros(len(y)))
    correct = answered & correct_at_rank(res, y, hierarchy.membership)
    rolled = answered & (rank > 0)
    leaf_share = float((answered & (rank == 0)).mean()) if len(y) else float("nan")
    return RollupFigures(tuple(accuracy), len(y), int(rolled.sum()), int((rolled & correct).sum()),
                         int((~correct).sum()), leaf_share)
