"""The data of one SMTP ``DATA``, read in runs of lines rather than one line at a time.

aiosmtpd's loop, and ours until 2026-12-02, awaited ``StreamReader.readuntil(b"\\r\\n")``
once a line: a coroutine, a buffer search, copies and the loop's own checks for each
of a message's lines, about 150 for a 10 KB mail and 700 for a 50 KB attachment in
base64. Here the reader is asked for ``readuntil(b".\\r\\n")``: everything up to the
next line that ends with a dot, which is the final dot when the dot begins its line.
Base64 has no dot, so an attachment arrives in one run; text stops at the lines that
end a sentence. Each run is checked and dot-unstuffed as a whole, by ``bytes``
methods, with the rules of the line loop:

- the final dot is a line of one ``.`` (RFC 5321 section 4.5.2), and a line that
  starts with a dot loses that dot (transparency);
- lines end with CRLF only: a bare CR or LF stays inside its line;
- a line longer than the reader's limit is ``500 Line too long``, more bytes on the
  wire than the size limit ``552``: both are answered after the final dot, and
  nothing more of the message is kept once either is decided;
- the body's room is asked for (``room``) before the body grows; a refusal is the
  storage reply (``452``), also after the final dot.

One difference: a message that fails more than one of these may get another of the
replies than the line loop gave it, which named the first failure on the wire; here
a run is judged whole (a line too long, then the size, then the room). Any of them
ends the message the same way: nothing kept, the reply after the final dot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: Replies decided here (the server rewrites them with enhanced status codes).
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"

_CRLF = b"\r\n"
_END = b".\r\n"
_FINAL = b"\r\n.\r\n"
_STUFFED = b"\r\n."


class MessageData:
    """One message's data as runs of it arrive (see :func:`read_message`).

    ``failed`` is the reply once the message cannot be taken; until then ``body``
    holds it, unstuffed. ``on_wire`` counts the bytes before the final dot."""

    def __init__(
        self, *, size_limit: int | None, line_limit: int, room: Callable[[int], bool], full: str
    ) -> None:
        self.body = bytearray()
        self.on_wire = 0
        self.failed: str | None = None
        self._size_limit = size_limit
        self._line_limit = line_limit
        self._room = room
        self._full = full
        # The line not yet ended: its bytes while the message is kept (the reader's
        # limit cuts runs anywhere), else only its last byte (a CR that the next run's
        # LF ends); and its whole length.
        self._open = b""
        self._open_length = 0

    def feed(self, run: bytes) -> bool:
        """A run that ends with ``.\\r\\n``. True when that line is the final dot (a
        line of its own, the CRLF before it perhaps split over two runs)."""
        if run == _END and self._open_length == 0:
            return True
        if run.endswith(_FINAL) or (run == b"\n" + _END and self._open.endswith(b"\r")):
            self._add(run[: -len(_END)])
            return True
        self._add(run)
        return False

    def feed_part(self, part: bytes) -> None:
        """A run the reader's limit cut: it holds no ``.\\r\\n`` and may end mid-line."""
        self._add(part)

    def _add(self, data: bytes) -> None:
        self.on_wire += len(data)
        text = self._open + data if self._open else data
        dropped = self._open_length - len(self._open)  # of the open line, not kept
        cut = text.rfind(_CRLF) + len(_CRLF)  # 1 when no line ends here
        if cut < len(_CRLF):
            self._open_length = dropped + len(text)
            whole, rest = b"", text
        else:
            whole, rest = text[:cut], text[cut:]
            if self.failed is None and (
                dropped + whole.find(_CRLF) > self._line_limit
                or (
                    len(whole) > self._line_limit
                    and max(map(len, whole.split(_CRLF))) > self._line_limit
                )
            ):
                self._fail(LINE_TOO_LONG)
            self._open_length = len(rest)
        # A CR at the end may begin the line's CRLF: not counted in its length yet.
        if self._open_length - rest.endswith(b"\r") > self._line_limit:
            self._fail(LINE_TOO_LONG)
        if self.failed is None and self._size_limit and self.on_wire > self._size_limit:
            self._fail(TOO_MUCH_DATA)
        if self.failed is None and whole:
            # Runs begin at a line start while the message is kept (the open line is
            # kept whole), so the first line's dot is the run's first byte.
            unstuffed = whole.replace(_STUFFED, _CRLF)
            if whole.startswith(b"."):
                unstuffed = unstuffed[1:]
            if self._room(len(self.body) + len(unstuffed)):
                self.body += unstuffed
            else:
                self._fail(self._full)
        self._open = rest if self.failed is None else rest[-1:]

    def _fail(self, reply: str) -> None:
        if self.failed is None:
            self.failed = reply
        self.body = bytearray()


async def read_message(
    reader: asyncio.StreamReader, data: MessageData, connected: Callable[[], bool]
) -> bool:
    """Read ``reader`` to the final dot into ``data``: True then, False when the
    connection went away first (``connected`` says so before each read). Raises what
    the reader raises (``IncompleteReadError`` when the stream ends first)."""
    while connected():
        try:
            run = await reader.readuntil(_END)
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" within the reader's limit: what it holds up to where one
            # could still begin (a separator is never split between two runs).
            data.feed_part(await reader.readexactly(exc.consumed))
            continue
        if data.feed(run):
            return True
    return False
