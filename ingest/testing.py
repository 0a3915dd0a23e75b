"""The adapter conformance kit: one line runs the standard suite on any adapter.

::

    from ingest.testing import Answer, Malformed, adapter_conformance, post

    def deliver(running, sample):
        return post(running, "/webhooks/widget", json=sample, headers=AUTH)

    TestWidget = adapter_conformance(
        WidgetAdapter,
        settings=WidgetSettings(token=SecretStr("t0ken")),
        deliver=deliver,
        samples=[{"id": "m-1", "visitor": {"email": "ann@example.org"}, "text": "hi"}],
        malformed=[Malformed({"text": "no visitor"}, status="400")],
    )

The class runs against a real Kafka-protocol broker (the embedded Tansu, one
per test session, or ``SWITCHBOARD_TEST_KAFKA_BOOTSTRAP``), a real SQLite
database and the adapter's real protocol: HTTP adapters are served by uvicorn
on a loopback port; other adapters are started as ``switchboard run`` starts
them. It checks, in this order:

1. the adapter starts and stops cleanly, and leaves no thread behind;
2. each delivered sample is acknowledged and becomes exactly one
   ``InboundMessage`` on ``switchboard.inbound.v1``, valid against the model
   and against the checked-in JSON Schema (``schemas/inbound_message.v1.json``);
3. a sample delivered twice gives the same dedupe key twice;
4. malformed input gets the documented answer (and, for ``dead-letter``, a
   dead letter with the documented reason), and the adapter still works after;
5. when the hand-off cannot make a message durable (the broker is away), the
   sender is never told it was accepted;
6. no secret (every ``SecretStr`` in the settings, plus ``secrets=``) appears in
   any log record, at DEBUG, or in the repr of the adapter, its settings or
   its context.

``deliver(running, sample)`` sends one sample through the adapter's protocol
and returns an :class:`Answer`: what the sender was told. :func:`post` does it
for HTTP adapters. Its ``switchboard_kafka`` fixture, the broker the suite runs
on, is also a pytest plugin (``ingest.pytest_plugin``, entry point ``switchboard``,
loaded wherever Switchboard is installed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import BaseModel, SecretStr

from ingest.handoff import HandOff
from ingest.migrations import CHAIN
from ingest.sdk import Adapter, AdapterContext, HttpAdapter, mount_adapters
from ingest.workers import ParserPool
from normalize.schema import DeadLetter, InboundMessage
from switchboard.blobs import PackBlobStore
from switchboard.broker import EmbeddedBroker, free_port
from switchboard.config import KafkaSettings
from switchboard.db import make_engine, migrate
from switchboard.http import Readiness, create_app
from switchboard.kafka import Publisher
from switchboard.logs import CONTENT_LOGGERS
from switchboard.runtime import HttpServer
from switchboard.schemas import schema_documents
from switchboard.topics import DEADLETTER, INBOUND, ensure_topics

__all__ = ["Answer", "Deliver", "Malformed", "Running", "adapter_conformance", "post"]


@dataclass(frozen=True)
class Answer:
    """What the sender was told: ``acknowledged`` means "you may forget it"
    (HTTP 2xx, SMTP 250, an IMAP checkpoint past the message)."""

    acknowledged: bool
    status: str  # "202", "250", "451", "checkpoint", "not-advanced"...
    detail: str = ""


@dataclass(frozen=True)
class Malformed:
    """Input the adapter must refuse or keep aside, never crash on.

    ``expect="reject"``: the answer is ``status`` and not an acknowledgement.
    ``expect="dead-letter"``: the answer is ``status`` (an acknowledgement: the
    input is kept) and a dead letter with ``reason`` is published.
    """

    sample: Any
    status: str
    expect: Literal["reject", "dead-letter"] = "reject"
    reason: str | None = None


@dataclass
class Running:
    """One running adapter instance, what ``deliver`` needs to reach it."""

    adapter: Adapter[Any]
    kafka: KafkaSettings
    data_dir: Path
    base_url: str | None = None  # HTTP adapters: http://127.0.0.1:<port>
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _server: HttpServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _parsers: ParserPool | None = field(default=None, repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)


Deliver = Callable[[Running, Any], Answer]


def post(running: Running, path: str, **request: Any) -> Answer:  # noqa: ANN401
    """POST to an HTTP adapter; acknowledged on 2xx. ``request``: httpx arguments."""
    assert running.base_url is not None, "post() is for HTTP adapters"
    response = httpx.post(f"{running.base_url}{path}", timeout=30, **request)
    return Answer(200 <= response.status_code < 300, str(response.status_code), response.text)


# -- the pytest plugin ---------------------------------------------------------


@pytest.fixture(scope="session")
def switchboard_kafka() -> Iterator[KafkaSettings]:
    """A real broker for the session: ``SWITCHBOARD_TEST_KAFKA_BOOTSTRAP`` or an
    embedded Tansu started here (the main thread, so it lives as long as pytest)."""
    bootstrap = os.environ.get("SWITCHBOARD_TEST_KAFKA_BOOTSTRAP")
    if bootstrap:
        settings = KafkaSettings(bootstrap=bootstrap)
        ensure_topics(settings)
        yield settings
        return
    with EmbeddedBroker() as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap)
        ensure_topics(settings)
        yield settings


# -- running an adapter ----------------------------------------------------------


def _start(
    adapter_class: type[Adapter[Any]],
    settings: object,
    kafka: KafkaSettings,
    data_dir: Path,
) -> Running:
    data_dir.mkdir(parents=True, exist_ok=True)
    publisher = Publisher(kafka)
    handoff = HandOff(publisher, PackBlobStore(data_dir / "blobs"))
    engine = make_engine(f"sqlite:///{data_dir / 'switchboard.db'}")
    migrate(engine, [CHAIN])  # the IMAP checkpoints
    stops: list[str] = []
    # An adapter that parses mail in a parse process is run with a real one: its
    # `authenticate` and `parse` must work there (picklable, without the context).
    offload = issubclass(adapter_class, HttpAdapter) and bool(adapter_class.offload)
    parsers = ParserPool(1, 30.0) if offload else None
    context = AdapterContext(handoff, engine=engine, on_stop=stops.append, parsers=parsers)
    adapter = adapter_class(settings, context)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="conformance-loop")
    thread.start()
    running = Running(adapter, kafka, data_dir, loop=loop, _thread=thread)
    running._closers += [engine.dispose, lambda: publisher.close(timeout_s=2), handoff.close]
    if parsers is not None:
        asyncio.run_coroutine_threadsafe(parsers.start(), loop).result(60)
        running._parsers = parsers
    if isinstance(adapter, HttpAdapter):
        app = create_app(Readiness())
        mount_adapters(app, [adapter])
        server = HttpServer(app, "127.0.0.1", 0)
        running._server = server
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(20)
        running.base_url = f"http://127.0.0.1:{server.port}"
    asyncio.run_coroutine_threadsafe(adapter.start(), loop).result(20)
    return running


def _stop(running: Running, timeout_s: float = 15) -> float:
    """Stop as the runtime does (the edge first); returns the seconds it took."""
    assert running.loop is not None
    assert running._thread is not None
    started = time.monotonic()
    if running._server is not None:
        asyncio.run_coroutine_threadsafe(running._server.stop(), running.loop).result(timeout_s)
    asyncio.run_coroutine_threadsafe(running.adapter.stop(), running.loop).result(timeout_s)
    took = time.monotonic() - started
    if running._parsers is not None:
        asyncio.run_coroutine_threadsafe(running._parsers.stop(), running.loop).result(timeout_s)
    asyncio.run_coroutine_threadsafe(running.loop.shutdown_default_executor(), running.loop).result(
        timeout_s
    )
    running.loop.call_soon_threadsafe(running.loop.stop)
    running._thread.join(5)
    running.loop.close()
    for close in reversed(running._closers):
        close()
    return took


def _unreachable(kafka: KafkaSettings) -> KafkaSettings:
    """Settings of a broker that is not there: every publish fails within seconds."""
    return kafka.model_copy(
        update={
            "bootstrap": f"127.0.0.1:{free_port()}",
            "max_block_ms": 1000,
            "request_timeout_ms": 1000,
            "delivery_timeout_ms": 2000,
            "publish_timeout_s": 2.0,
        }
    )


# -- reading what was published ------------------------------------------------


class _Tail:
    """Records published to one topic from now on (no consumer group: no joins)."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._consumer = KafkaConsumer(
            enable_auto_commit=False, client_id="conformance-kit", **kafka.client_config()
        )
        partitions = self._consumer.partitions_for_topic(topic) or set()
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        self._consumer.seek_to_end()
        for tp in self._consumer.assignment():
            self._consumer.position(tp)  # resolve "end" now, not at the first poll

    def read(self, until: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> list[Any]:
        """Event payloads (record values: the model's JSON) until ``until`` or the timeout."""
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not until(found):
            for batch in self._consumer.poll(timeout_ms=200).values():
                found.extend(json.loads(record.value) for record in batch)
        return found

    def close(self) -> None:
        self._consumer.close()


def _inbound_schema() -> dict[str, Any]:
    """The checked-in JSON Schema when this is a Switchboard checkout, else the
    one generated from the installed models (what ``schema export`` writes)."""
    name = "inbound_message.v1.json"
    checked_in = Path(__file__).resolve().parents[1] / "schemas" / name
    text = checked_in.read_text() if checked_in.is_file() else schema_documents()[name]
    schema: dict[str, Any] = json.loads(text)
    return schema


def _validate_schema(data: dict[str, Any]) -> None:
    try:
        import jsonschema  # noqa: PLC0415 - only the kit needs it: the [testing] extra
    except ImportError:
        pytest.fail(
            "the conformance kit needs jsonschema: pip install 'switchboard-inbound[testing]'"
        )
    jsonschema.validate(data, _inbound_schema())


def _secrets_in(value: object, seen: set[int] | None = None) -> Iterator[str]:
    """Every SecretStr value inside pydantic models, lists and dicts."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, SecretStr):
        if len(value.get_secret_value()) >= 4:  # shorter ones match by chance
            yield value.get_secret_value()
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secrets_in(getattr(value, name), seen)
    elif isinstance(value, list | tuple | set):
        for item in value:
            yield from _secrets_in(item, seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _secrets_in(item, seen)


class _Capture(logging.Handler):
    """Every log record, formatted with all its extras, for the secrets check."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is still text to check
            message = str(record.msg)
        extras = {k: v for k, v in vars(record).items() if k not in ("msg", "args")}
        self.texts.append(f"{message} {record.exc_text or ''} {extras!r}")


# -- the suite -----------------------------------------------------------------


def adapter_conformance(
    adapter_class: type[Adapter[Any]],
    *,
    settings: object | Callable[[pytest.FixtureRequest], object],
    deliver: Deliver,
    samples: Sequence[Any],
    malformed: Sequence[Malformed] = (),
    secrets: Sequence[str] = (),
    settle_s: float = 1.5,
    timeout_s: float = 20.0,
) -> type:
    """A pytest test class running the standard suite on ``adapter_class``.

    ``settings``: the adapter's settings, or a function of the pytest request
    that builds them (to use fixtures: a mail server, a port). ``deliver``: sends
    one sample and returns the :class:`Answer`. ``samples``: valid inputs, each
    different. ``malformed``: inputs and their documented answers. ``secrets``:
    strings that must never be logged, besides the settings' ``SecretStr``.
    ``settle_s``: how long to watch for a second message after the first.
    """
    if not samples:
        raise ValueError("adapter_conformance needs at least one valid sample")
    name = adapter_class.name

    def _ours(data: dict[str, Any]) -> bool:
        # An adapter names its messages "<name>" or "<name>:<instance>" (a mailbox, a hook).
        adapter = str(data.get("adapter", ""))
        return adapter == name or adapter.startswith(f"{name}:")

    class Conformance:
        @pytest.fixture(scope="class")
        @classmethod
        def adapter_settings(cls, request: pytest.FixtureRequest) -> object:
            return settings(request) if callable(settings) else settings

        @pytest.fixture(scope="class")
        @classmethod
        def captured(cls) -> Iterator[_Capture]:
            # Production keeps content loggers at INFO (switchboard.logs); so does this.
            capture = _Capture()
            root = logging.getLogger()
            level = root.level
            quiet = (*CONTENT_LOGGERS, "kafka")  # kafka-python's DEBUG is protocol dumps
            pinned = {n: logging.getLogger(n).level for n in quiet}
            root.addHandler(capture)
            root.setLevel(logging.DEBUG)
            for logger_name in quiet:
                logging.getLogger(logger_name).setLevel(logging.INFO)
            try:
                yield capture
            finally:
                root.removeHandler(capture)
                root.setLevel(level)
                for logger_name, old in pinned.items():
                    logging.getLogger(logger_name).setLevel(old)

        @pytest.fixture(scope="class")
        @classmethod
        def running(
            cls,
            switchboard_kafka: KafkaSettings,
            adapter_settings: object,
            captured: _Capture,
            tmp_path_factory: pytest.TempPathFactory,
        ) -> Iterator[Running]:
            instance = _start(
                adapter_class, adapter_settings, switchboard_kafka, tmp_path_factory.mktemp(name)
            )
            try:
                yield instance
            finally:
                _stop(instance)

        def _one_each(self, running: Running, sample: Any, times: int) -> list[Any]:  # noqa: ANN401
            tail = _Tail(running.kafka, INBOUND)
            try:
                for attempt in range(times):
                    answer = deliver(running, sample)
                    assert answer.acknowledged, (
                        f"{name}: delivery {attempt + 1} of a valid sample was not "
                        f"acknowledged: {answer.status} {answer.detail[:300]}"
                    )

                def ours(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
                    return [m for m in found if _ours(m)]

                def never(_found: list[dict[str, Any]]) -> bool:
                    return False

                first = tail.read(lambda found: len(ours(found)) >= times, timeout_s)
                # Then watch a little longer: a second message for one input is a bug.
                return ours(first + tail.read(never, settle_s))
            finally:
                tail.close()

        def test_starts_and_stops_cleanly(
            self,
            switchboard_kafka: KafkaSettings,
            adapter_settings: object,
            tmp_path_factory: pytest.TempPathFactory,
        ) -> None:
            before = set(threading.enumerate())
            for _round in range(2):  # a second start proves the first released everything
                instance = _start(
                    adapter_class,
                    adapter_settings,
                    switchboard_kafka,
                    tmp_path_factory.mktemp(f"{name}-startstop"),
                )
                took = _stop(instance)
                assert took < 10, f"{name}: stop took {took:.1f}s"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
                if not left:
                    break
                time.sleep(0.1)
            assert not left, f"{name}: threads left after stop: {[t.name for t in left]}"

        @pytest.mark.parametrize("index", range(len(samples)))
        def test_each_sample_becomes_exactly_one_valid_message(
            self, running: Running, index: int
        ) -> None:
            # The published payloads were already written by the model; both checks
            # below must hold for every consumer of the stream.
            received = self._new_messages(running, samples[index])
            assert len(received) == 1, f"{name}: sample {index} gave {len(received)} messages"
            InboundMessage.model_validate(received[0])
            _validate_schema(received[0])
            assert _ours(received[0])

        def _new_messages(self, running: Running, sample: Any) -> list[Any]:  # noqa: ANN401
            return self._one_each(running, sample, times=1)

        def test_the_dedupe_key_is_stable_when_delivered_twice(self, running: Running) -> None:
            received = self._one_each(running, samples[0], times=2)
            keys = {m["dedupe_key"] for m in received}
            assert len(received) >= 1, f"{name}: nothing published"
            assert len(keys) == 1, f"{name}: one input, several dedupe keys: {sorted(keys)}"

        @pytest.mark.parametrize("index", range(len(malformed)))
        def test_malformed_input_gets_its_documented_answer(
            self, running: Running, index: int
        ) -> None:
            case = malformed[index]
            tail = _Tail(running.kafka, DEADLETTER)
            try:
                answer = deliver(running, case.sample)
                assert answer.status == case.status, (
                    f"{name}: malformed case {index} answered {answer.status}, documented "
                    f"{case.status}: {answer.detail[:300]}"
                )
                assert answer.acknowledged is (case.expect == "dead-letter"), answer
                if case.expect == "dead-letter":
                    letters = tail.read(lambda found: any(_ours(d) for d in found), timeout_s)
                    ours = [DeadLetter.model_validate(d) for d in letters if _ours(d)]
                    assert ours, f"{name}: malformed case {index} was acknowledged, not kept"
                    assert case.reason is None or ours[0].reason == case.reason, ours[0]
            finally:
                tail.close()
            # Never a crash: the same instance still takes a valid sample.
            assert deliver(running, samples[-1]).acknowledged, f"{name}: broken after case {index}"

        def test_a_failed_hand_off_is_never_acknowledged(
            self,
            running: Running,
            switchboard_kafka: KafkaSettings,
            adapter_settings: object,
            tmp_path_factory: pytest.TempPathFactory,
        ) -> None:
            broken = _start(
                adapter_class,
                adapter_settings,
                _unreachable(switchboard_kafka),
                tmp_path_factory.mktemp(f"{name}-nobroker"),
            )
            try:
                answer = deliver(broken, samples[0])
            finally:
                _stop(broken)
            assert not answer.acknowledged, (
                f"{name}: told the sender {answer.status} although nothing was durable"
            )

        def test_secrets_never_appear_in_logs_or_reprs(
            self, running: Running, adapter_settings: object, captured: _Capture
        ) -> None:
            values = [*_secrets_in(adapter_settings), *secrets]
            assert captured.texts, f"{name}: nothing was logged at all; is the capture wired?"
            shown = [
                repr(running.adapter),
                repr(adapter_settings),
                str(adapter_settings),
                repr(running.adapter.context),
                *captured.texts,
            ]
            for secret in values:
                leaks = [text[:200] for text in shown if secret in text]
                assert not leaks, f"{name}: a secret appears in {len(leaks)} places: {leaks[:3]}"

    Conformance.__name__ = f"Conformance{adapter_class.__name__}"
    Conformance.__qualname__ = Conformance.__name__
    return Conformance
