"""Benchmarks that print figures: ``hybridcls bench quality`` and ``hybridcls bench speed``."""

from __future__ import annotations

__all__: list[str] = []
