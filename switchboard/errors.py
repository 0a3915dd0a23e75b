"""Errors shared by every part, in a module that imports nothing heavy.

A parse process imports ``ingest.errors`` (through ``ingest.workers``); when that
took ``StartupError`` from ``switchboard.runtime`` it also imported uvicorn,
FastAPI, the HTTP limits and kafka-python: 0.75 s of CPU at every parse process's
start, for a class (2026-12-01, slow boot).
"""

from __future__ import annotations


class StartupError(RuntimeError):
    """A component could not start (port in use, bad certificate...): say so and exit 1."""
