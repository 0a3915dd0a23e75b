"""HTTP calls to the servers the tests start on loopback.

`local_http.get()` and `local_http.post()` build a client per call, and a new client loads the
CA bundle into a fresh SSL context: 31 ms of CPU on a slow boot of the 2-core machine,
far more than the request itself (measured 2026-12-01). A readiness loop polling every
0.1 s spent a third of a core on it, and the fault suite's senders and queue reads most
of the test process's CPU. These take the same arguments and pass one SSL context,
built once; every call still opens a connection of its own, as a new client does.
"""

from __future__ import annotations

from typing import Any

import httpx

_TLS = httpx.create_ssl_context()


def get(url: str, **kwargs: Any) -> httpx.Response:  # noqa: ANN401 - httpx.get's arguments
    return httpx.get(url, verify=_TLS, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:  # noqa: ANN401 - httpx.post's arguments
    return httpx.post(url, verify=_TLS, **kwargs)
