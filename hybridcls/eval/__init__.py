"""Metrics on predictions: overall accuracy, the generalised zero-shot S / U / H, calibration (ECE)."""

from __future__ import annotations

from hybridcls.eval.labels import join_labels, read_labels
from hybridcls.eval.metrics import OpenSetScores, Reliability, open_set_scores, reliability

__all__ = ["OpenSetScores", "Reliability", "join_labels", "open_set_scores", "read_labels",
           "reliability"]
