"""Metrics on predictions: overall accuracy and the generalised zero-shot S / U / H."""

from __future__ import annotations

from hybridcls.eval.labels import read_labels
from hybridcls.eval.metrics import OpenSetScores, open_set_scores

__all__ = ["OpenSetScores", "open_set_scores", "read_labels"]
