"""Hook POSTs past the router (switchboard.http.DirectPosts), with the same answers."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response

from switchboard.http import BodyTooLarge, Readiness, create_app


@pytest.fixture
def app() -> FastAPI:
    app = create_app(Readiness())

    async def hook(request: Request) -> Response:
        body = await request.body()
        if body == b"too big":
            raise BodyTooLarge(10)
        if body == b"bug":
            raise RuntimeError("a bug in the endpoint")
        return Response(b"taken " + body, status_code=202)

    # Only in the direct table, not in the router: an answer proves the bypass.
    app.state.direct_posts["/webhooks/direct"] = hook
    return app


class Client:
    """Requests to the app in process (httpx's ASGI transport), a 500 answered as one."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:  # noqa: ANN401
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(call())

    def post(self, path: str, content: bytes = b"") -> httpx.Response:
        return self.request("POST", path, content=content)

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)


@pytest.fixture
def client(app: FastAPI) -> Client:
    return Client(app)


def test_a_post_to_a_hook_path_reaches_its_endpoint_without_the_router(
    client: Client,
) -> None:
    answer = client.post("/webhooks/direct", content=b"hello")
    assert (answer.status_code, answer.content) == (202, b"taken hello")


def test_other_methods_and_paths_still_go_through_the_router(client: Client) -> None:
    assert client.get("/webhooks/direct").status_code in (404, 405)
    assert client.post("/webhooks/direct/").status_code == 404  # not the hook's path
    assert client.get("/healthz").json() == {"status": "ok"}


def test_an_error_with_a_handler_gets_the_handlers_answer(client: Client) -> None:
    answer = client.post("/webhooks/direct", content=b"too big")
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"] == "the body is over 10 bytes"


def test_any_other_error_is_a_500_from_the_server_error_middleware(
    client: Client,
) -> None:
    assert client.post("/webhooks/direct", content=b"bug").status_code == 500


def test_the_body_limit_still_applies_before_the_endpoint(app: FastAPI) -> None:
    app.state.body_limits.set("/webhooks/direct", 8)
    answer = Client(app).post("/webhooks/direct", content=b"x" * 100)
    assert answer.status_code == 413
