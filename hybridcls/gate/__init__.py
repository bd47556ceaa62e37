"""The gate: scores that say "not a seen class", their calibration, and fusion.

Works on arrays only (logits, features, embeddings); it never loads a model
or an image. Every score is higher = less like the seen classes.

Example:
    >>> import numpy as np
    >>> from hybridcls.gate import GateCalibration, compute_scores, finalize, fuse
    >>> sup = np.array([[4.0, 0.0], [0.2, 0.1]])
    >>> clip = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    >>> s = compute_scores(["clip_margin"], clip_logits=clip, n_seen=2)["clip_margin"]
    >>> cal = finalize(GateCalibration(score="clip_margin", tpr=1.0), s[:1])
    >>> fuse("hard", sup_logits=sup, clip_logits=clip, gate_score=s, calibration=cal).pred.tolist()
    [0, 2]
"""

from __future__ import annotations

from hybridcls.gate.branches import BranchOutputs
from hybridcls.gate.cache_branch import (
    ALPHA_GRID,
    BETA_GRID,
    CACHE_MODES,
    DEFAULT_CACHE_K,
    CacheBranch,
    cache_logits,
    fit_cache_branch,
)
from hybridcls.gate.calibration import (
    apply_transductive,
    finalize,
    fit_temperature,
    from_candidate,
    leave_classes_out,
    threshold_at_tpr,
    transductive_threshold,
)
from hybridcls.gate.cascade import (
    CASCADE_KNN_K,
    DEFAULT_AGREEMENT,
    DEFAULT_DISTANCE_TPR,
    cascade_keep,
    cascade_seen_share,
    fit_cascade,
    max_softmax,
    threshold_from_seen_share,
)
from hybridcls.gate.config import FIT_METHODS, GATE_FILENAME, METHODS, MODES, GateCalibration
from hybridcls.gate.fusion import FusionResult, fuse, fuse_zeroshot, route, topk
from hybridcls.gate.gate import INDEX_DIR, ClipPolicy, Gate
from hybridcls.gate.metrics import (
    GateDetection,
    OpenSetClassification,
    RoutingMatrix,
    StackingCurve,
    ausuc,
    gate_detection,
    open_set_classification,
    routing_matrix,
    seen_unseen_accuracy,
)
from hybridcls.gate.scores import (
    INPUTS,
    SCORES,
    CombinedScore,
    clip_margin_score,
    compute_scores,
    energy_score,
    entropy_score,
    knn_distance_score,
    max_logit_score,
    mcm_score,
    msp_score,
    unseen_mass_score,
)

__all__ = [
    "ALPHA_GRID",
    "BETA_GRID",
    "CACHE_MODES",
    "CASCADE_KNN_K",
    "DEFAULT_AGREEMENT",
    "DEFAULT_CACHE_K",
    "DEFAULT_DISTANCE_TPR",
    "FIT_METHODS",
    "GATE_FILENAME",
    "INDEX_DIR",
    "INPUTS",
    "METHODS",
    "MODES",
    "SCORES",
    "BranchOutputs",
    "CacheBranch",
    "ClipPolicy",
    "CombinedScore",
    "FusionResult",
    "Gate",
    "GateCalibration",
    "GateDetection",
    "OpenSetClassification",
    "RoutingMatrix",
    "StackingCurve",
    "apply_transductive",
    "ausuc",
    "cache_logits",
    "cascade_keep",
    "cascade_seen_share",
    "clip_margin_score",
    "compute_scores",
    "energy_score",
    "entropy_score",
    "finalize",
    "fit_cache_branch",
    "fit_cascade",
    "fit_temperature",
    "from_candidate",
    "fuse",
    "fuse_zeroshot",
    "gate_detection",
    "knn_distance_score",
    "leave_classes_out",
    "max_logit_score",
    "max_softmax",
    "mcm_score",
    "msp_score",
    "open_set_classification",
    "route",
    "routing_matrix",
    "seen_unseen_accuracy",
    "threshold_at_tpr",
    "threshold_from_seen_share",
    "topk",
    "transductive_threshold",
    "unseen_mass_score",
]
