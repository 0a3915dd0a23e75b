"""The HTTP app shell: health and readiness. Stages mount their routes on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.responses import JSONResponse

# A readiness check raises (any exception) when its dependency is unavailable.
Check = Callable[[], None]


@dataclass
class Readiness:
    """Named blocking checks, run off the event loop, results cached briefly so a
    busy load balancer cannot turn /readyz into load on Kafka or the database."""

    checks: dict[str, Check] = field(default_factory=dict)
    cache_s: float = 1.0
    timeout_s: float = 2.0
    _cached: tuple[float, dict[str, str]] | None = None

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def evaluate(self) -> dict[str, str]:
        now = time.monotonic()
        if self._cached and now - self._cached[0] < self.cache_s:
            return self._cached[1]

        async def run(check: Check) -> str:
            try:
                await asyncio.wait_for(asyncio.to_thread(check), self.timeout_s)
            except TimeoutError:
                return f"timeout after {self.timeout_s}s"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                return f"{type(exc).__name__}: {exc}"[:300]
            return "ok"

        names = list(self.checks)
        results = await asyncio.gather(*(run(self.checks[n]) for n in names))
        status = dict(zip(names, results, strict=True))
        self._cached = (now, status)
        return status


def create_app(readiness: Readiness) -> FastAPI:
    app = FastAPI(
        title="Switchboard",
        description="Inbound messages from every channel, one contact, one owner.",
        version="0.1.0",
    )

    @app.get("/healthz", tags=["operations"], summary="The process is running")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Dependencies are reachable")
    async def readyz() -> JSONResponse:
        checks = await readiness.evaluate()
        ready = all(result == "ok" for result in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    return app
