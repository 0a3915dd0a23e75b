"""DATA read in runs of lines (ingest/smtpdata.py) against the line-at-a-time loop it
replaced, on a real ``asyncio.StreamReader`` fed in random pieces: the same body, the
same reply, the same count of bytes, and nothing read past the final dot."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.smtpdata import LINE_TOO_LONG, TOO_MUCH_DATA, MessageData, read_message

FULL = "452 full"
Read = tuple[bytes, str | None, int]  # the body, the reply (None: taken), bytes on the wire
AFTER = b"QUIT\r\nMAIL FROM:<a@b.c>\r\n"


async def _line_loop(
    reader: asyncio.StreamReader, size_limit: int | None, room: Callable[[int], bool], limit: int
) -> Read:
    """The loop as it was before 2026-12-02 (ingest/smtp.py), the reference."""
    body = bytearray()
    on_wire = 0
    failed: str | None = None
    inside_long_line = False
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            failed = failed or LINE_TOO_LONG
            body = bytearray()
            on_wire += len(await reader.read(exc.consumed))
            inside_long_line = True
            continue
        if inside_long_line:
            inside_long_line = False
            on_wire += len(line)
            continue
        if line == b".\r\n":
            break
        on_wire += len(line)
        if failed is None and size_limit and on_wire > size_limit:
            failed = TOO_MUCH_DATA
            body = bytearray()
        if failed is not None:
            continue
        start = 1 if line.startswith(b".") else 0
        if not room(len(body) + len(line) - start):
            failed = FULL
            body = bytearray()
            continue
        body += memoryview(line)[start:]
    return bytes(body), failed, on_wire


async def _runs(
    reader: asyncio.StreamReader, size_limit: int | None, room: Callable[[int], bool], limit: int
) -> Read:
    data = MessageData(size_limit=size_limit, line_limit=limit, room=room, full=FULL)
    assert await read_message(reader, data, lambda: True)
    return bytes(data.body), data.failed, data.on_wire


def _read(
    how: Callable[[asyncio.StreamReader, int | None, Callable[[int], bool], int], Awaitable[Read]],
    stream: bytes,
    cuts: list[int],
    limit: int,
    size_limit: int | None,
    room_cap: int,
) -> tuple[Read, bytes]:
    """Run ``how`` on a reader fed ``stream`` in pieces at ``cuts``, one piece a turn
    of the loop; what it returns and what is left in the reader after it."""

    async def main() -> tuple[Read, bytes]:
        reader = asyncio.StreamReader(limit=limit)
        points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})

        async def feed() -> None:
            for a, b in itertools.pairwise(points):
                reader.feed_data(stream[a:b])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        result = await how(reader, size_limit, lambda needed: needed <= room_cap, limit)
        await feeder
        return result, await reader.read()

    return asyncio.run(main())


_LINE = st.lists(
    st.sampled_from([b"x", b"y", b".", b"\r", b"\n", b"\r\n", b"..", b"xxxxxxxx"]), max_size=12
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    lines=st.lists(_LINE, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    limit=st.integers(min_value=4, max_value=80),
    size_limit=st.one_of(st.none(), st.integers(min_value=1, max_value=400)),
    room_cap=st.one_of(st.just(10**9), st.integers(min_value=0, max_value=300)),
)
def test_runs_of_lines_read_what_the_line_loop_read(
    lines: list[bytes], cuts: list[int], limit: int, size_limit: int | None, room_cap: int
) -> None:
    # Lines as a client sends them (a lone "." would end the message early, as it
    # does on the wire: both readers must agree on that too).
    stream = b"".join(line + b"\r\n" for line in lines) + b".\r\n" + AFTER
    old = _read(_line_loop, stream, cuts, limit, size_limit, room_cap)
    new = _read(_runs, stream, cuts, limit, size_limit, room_cap)
    (old_body, old_failed, old_wire), old_left = old
    (new_body, new_failed, new_wire), new_left = new
    assert new_left == old_left  # nothing read past the final dot
    assert new_wire == old_wire
    if old_failed is not None and new_failed is not None and new_failed != old_failed:
        # A message with two failures may be told the other one (the module's
        # docstring); it is refused all the same.
        assert new_body == old_body == b""
        return
    assert (new_body, new_failed) == (old_body, old_failed)


@pytest.mark.parametrize(
    ("stream", "body"),
    [
        (b".\r\n", b""),  # an empty message
        (b"\r\n.\r\n", b"\r\n"),
        (b"a.\r\n.\r\n", b"a.\r\n"),  # a sentence's dot is not the end
        (b"..\r\n.\r\n", b".\r\n"),  # a stuffed dot line
        (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
        (b"a\n.\r\n.\r\n", b"a\n.\r\n"),  # a bare LF does not begin a line
        (b"a\r.\r\n.\r\n", b"a\r.\r\n"),  # nor does a bare CR
    ],
)
def test_dots(stream: bytes, body: bytes) -> None:
    for cuts in ([], list(range(len(stream) + len(AFTER)))):  # whole, and a byte a turn
        (got, failed, _), left = _read(_runs, stream + AFTER, cuts, 64, None, 10**9)
        assert (got, failed, left) == (body, None, AFTER)


def test_a_long_attachment_is_read_in_few_runs() -> None:
    """Base64 has no dot: 700 lines come as one run, not 700 awaits."""
    lines = b"QUJD" * 19 + b"\r\n"
    stream = b"Subject: x\r\n\r\n" + lines * 700 + b".\r\n"
    runs = []

    class Counting(MessageData):
        def feed(self, run: bytes) -> bool:
            runs.append(len(run))
            return super().feed(run)

    async def main() -> bytes:
        reader = asyncio.StreamReader(limit=128 * 1024)
        reader.feed_data(stream)
        data = Counting(size_limit=None, line_limit=128 * 1024, room=lambda n: True, full=FULL)
        assert await read_message(reader, data, lambda: True)
        return bytes(data.body)

    assert asyncio.run(main()) == stream[:-3]
    assert len(runs) == 1


def test_a_closed_connection_stops_the_read() -> None:
    async def main() -> bool:
        reader = asyncio.StreamReader()
        reader.feed_data(b"a.\r\nb\r\n.\r\n")
        data = MessageData(size_limit=None, line_limit=1000, room=lambda n: True, full=FULL)
        return await read_message(reader, data, lambda: False)

    assert asyncio.run(main()) is False


def test_a_line_that_never_ends_is_not_kept() -> None:
    """Past the line limit the line's bytes are dropped as they come: neither held nor
    copied again with each run (a 25 MB line would have been copied 200 times)."""
    data = MessageData(size_limit=None, line_limit=1000, room=lambda n: True, full=FULL)
    data.feed_part(b"ok\r\n" + b"x" * 900)
    assert bytes(data.body) == b"ok\r\n"  # the start of the long line is held apart
    for _ in range(100):
        data.feed_part(b"x" * 128 * 1024)
        assert data.failed == LINE_TOO_LONG
        assert len(data._open) <= 1
    assert not data.feed(b"x.\r\n")  # the long line's end: not the final dot
    assert data.feed(b".\r\n")
    assert data.on_wire == 4 + 900 + 100 * 128 * 1024 + 4


@pytest.mark.parametrize(
    "lines",
    [
        [b"x" * 20],  # a line over the limit (16) just before the final dot
        [b"x" * 10, b"y" * 10, b"z" * 10],  # lines within it, runs cut by it
        [b"x" * 15 + b"\r", b"y" * 16],  # a CR at the limit, then a line at it
    ],
)
def test_the_final_dot_is_found_wherever_a_cut_falls(lines: list[bytes]) -> None:
    """The reader's limit cuts a run anywhere, the CRLF before the final dot too
    (found by a review: a part ending in the CR, the next run "\\n.\\r\\n"). At every
    cut, the same as the line loop, and the pipelined commands left unread."""
    stream = b"".join(line + b"\r\n" for line in lines) + b".\r\n" + AFTER
    for cut in range(len(stream)):
        old = _read(_line_loop, stream, [cut], 16, None, 10**9)
        new = _read(_runs, stream, [cut], 16, None, 10**9)
        assert new == old, cut
        assert new[1] == AFTER, cut


def test_the_size_limit_counts_to_the_byte() -> None:
    """Exactly the size limit on the wire is taken; one byte more is 552."""
    message = b"a" * 98 + b"\r\n"  # 100 bytes on the wire
    (body, failed, wire), _ = _read(_runs, message + b".\r\n", [], 1000, 100, 10**9)
    assert (body, failed, wire) == (message, None, 100)
    (body, failed, wire), _ = _read(_runs, b"a" + message + b".\r\n", [], 1000, 100, 10**9)
    assert (body, failed, wire) == (b"", TOO_MUCH_DATA, 101)
