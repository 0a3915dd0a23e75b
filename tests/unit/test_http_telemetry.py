"""FastAPI's own OpenTelemetry: off unless a provider is set up when the app is built."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
from fastapi import FastAPI

CHECK = """
import sys
from opentelemetry import trace
if sys.argv[1] == "configured":
    trace.set_tracer_provider(trace.NoOpTracerProvider())
from switchboard.http import Readiness, create_app
app = create_app(Readiness())
print(app._telemetry["tracing"], app._native_telemetry.enabled())
"""


def _enabled(state: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHECK, state],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, **env},
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(
    "telemetry" not in inspect.signature(FastAPI.__init__).parameters,
    reason="this FastAPI has no telemetry of its own",
)
def test_telemetry_is_off_without_a_provider_and_on_with_one() -> None:
    # Off in the app's own settings: FastAPI then no longer asks OpenTelemetry.
    assert _enabled("bare") == "False False"
    assert _enabled("configured") == "True True"
    # FastAPI to set the providers up at start: left on for it to do so.
    assert _enabled("bare", FASTAPI_OTEL_AUTO_CONFIGURE="true").startswith("True")
