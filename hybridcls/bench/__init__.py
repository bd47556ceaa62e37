"""Benchmarks that print figures: ``hybridcls bench quality`` (and ``speed``, later)."""

from __future__ import annotations

__all__: list[str] = []
