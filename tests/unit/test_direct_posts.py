"""Hook POSTs past the router (switchboard.http.DirectPosts), with the same answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from pydantic import SecretStr

from ingest.handoff import HandOff
from ingest.postmark import PostmarkAdapter, PostmarkSettings
from ingest.sdk import AdapterContext, HttpAdapter, mount_adapters
from ingest.settings import WebhookSettings, WebhooksSettings
from ingest.webhook import WebhookAdapter
from switchboard.blobs import FileBlobStore
from switchboard.config import KafkaSettings
from switchboard.http import BodyTooLarge, Readiness, create_app
from switchboard.kafka import Publisher


class Sync(Exception):
    """Answered by a plain (not async) handler."""


@pytest.fixture
def app() -> FastAPI:
    app = create_app(Readiness())

    async def hook(request: Request) -> Response:
        body = await request.body()
        if body == b"too big":
            raise BodyTooLarge(10)
        if body == b"bug":
            raise RuntimeError("a bug in the endpoint")
        if body == b"teapot":
            raise HTTPException(418)
        if body == b"sync":
            raise Sync()
        if body == b"where":
            return Response(str(request.url_for("healthz")).encode(), status_code=200)
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


def test_handlers_are_picked_as_starlette_picks_them(app: FastAPI) -> None:
    """By status code first for an HTTP error; a plain function handler works too."""

    async def teapot(_request: Request, _exc: Exception) -> Response:
        return Response(b"short and stout", status_code=418)

    def sync(_request: Request, _exc: Exception) -> Response:
        return Response(b"answered", status_code=409)

    app.add_exception_handler(418, teapot)
    app.add_exception_handler(Sync, sync)
    client = Client(app)
    assert client.post("/webhooks/direct", content=b"teapot").content == b"short and stout"
    assert client.post("/webhooks/direct", content=b"sync").status_code == 409


def test_a_catch_all_handler_is_left_to_the_server_error_middleware(app: FastAPI) -> None:
    """It answers there, and the error still propagates (logged by the server), as
    from the router: not swallowed by the direct path."""

    async def anything(_request: Request, _exc: Exception) -> Response:
        return Response(b"sorry", status_code=500)

    app.add_exception_handler(Exception, anything)

    async def call() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/webhooks/direct", content=b"bug")

    with pytest.raises(RuntimeError, match="a bug in the endpoint"):
        asyncio.run(call())


def test_url_for_works_in_a_direct_endpoint(client: Client) -> None:
    """Starlette finds the routes through the app as well as through the router."""
    assert client.post("/webhooks/direct", content=b"where").text == "http://t/healthz"


def _mounted(tmp_path: Path, *adapters: type[HttpAdapter[Any]]) -> FastAPI:
    """The real Postmark adapter and a web hook named like it, in the given order."""
    handoff = HandOff(Publisher(KafkaSettings(bootstrap="127.0.0.1:1")), FileBlobStore(tmp_path))
    context = AdapterContext(handoff)
    hook = WebhookSettings.model_validate(
        {
            "name": "postmark",
            "auth": {"kind": "bearer", "token_env": "HOOK_TOKEN"},
            "map": {"email": "email"},
            "content_types": ["json"],
        }
    )
    made: dict[type[HttpAdapter[Any]], HttpAdapter[Any]] = {
        PostmarkAdapter: PostmarkAdapter(PostmarkSettings(password=SecretStr("pw")), context),
        WebhookAdapter: WebhookAdapter(WebhooksSettings(hooks=[hook]), context),
    }
    app = create_app(Readiness())
    mount_adapters(app, [made[cls] for cls in adapters])
    return app


@pytest.mark.parametrize(
    ("order", "challenge"),
    [((PostmarkAdapter, WebhookAdapter), "Basic"), ((WebhookAdapter, PostmarkAdapter), "Bearer")],
)
def test_of_two_adapters_on_one_path_the_first_mounted_answers_as_in_the_router(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    order: tuple[type[HttpAdapter[Any]], ...],
    challenge: str,
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "s3cret")
    app = _mounted(tmp_path, *order)
    direct = Client(app).request("POST", "/webhooks/postmark", json={})
    app.state.direct_posts.clear()  # the router alone
    routed = Client(app).request("POST", "/webhooks/postmark", json={})
    assert direct.status_code == routed.status_code == 401
    assert direct.headers["www-authenticate"].startswith(challenge)
    assert routed.headers["www-authenticate"] == direct.headers["www-authenticate"]


def test_an_adapter_with_a_router_of_its_own_is_not_served_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It may add dependencies to its routes, which the direct path would skip."""

    class Own(WebhookAdapter):
        def router(self) -> APIRouter:
            return super().router()

    monkeypatch.setenv("HOOK_TOKEN", "s3cret")
    handoff = HandOff(Publisher(KafkaSettings(bootstrap="127.0.0.1:1")), FileBlobStore(tmp_path))
    hook = WebhookSettings.model_validate(
        {"name": "own", "auth": {"kind": "bearer", "token_env": "HOOK_TOKEN"}, "map": {}}
    )
    app = create_app(Readiness())
    mount_adapters(app, [Own(WebhooksSettings(hooks=[hook]), AdapterContext(handoff))])
    assert "/webhooks/own" not in app.state.direct_posts
    assert Client(app).post("/webhooks/own").status_code in (401, 415)
