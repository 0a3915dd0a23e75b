"""FastAPI's own OpenTelemetry: off unless a provider is set up when the app is built."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
from opentelemetry import trace
if sys.argv[1] == "configured":
    trace.set_tracer_provider(trace.NoOpTracerProvider())
from switchboard.http import Readiness, create_app
app = create_app(Readiness())
print(app._telemetry["tracing"], app._native_telemetry.enabled())
"""


def _enabled(state: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHECK, state], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def test_telemetry_is_off_without_a_provider_and_on_with_one() -> None:
    # Off in the app's own settings: FastAPI then no longer asks OpenTelemetry.
    assert _enabled("bare") == "False False"
    assert _enabled("configured") == "True True"
