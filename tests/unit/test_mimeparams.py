"""normalize.mimeparams: the standard library's MIME parameter splitting, in linear time."""

from __future__ import annotations

import email.message
from email.parser import BytesParser
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st

from normalize import mimeparams


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=';"\\= aB\t', max_size=60))
def test_it_splits_as_the_standard_library_does(header: str) -> None:
    assert mimeparams.parseparam(header) == mimeparams.STDLIB(header)


def test_it_is_what_the_parser_calls() -> None:
    assert email.message._parseparam is mimeparams.parseparam  # type: ignore[attr-defined]
    raw = b'Content-Type: text/plain; charset="utf-8"; name="a;b.txt"\r\n\r\nhi\r\n'
    message = BytesParser(policy=compat32).parsebytes(raw)
    assert message.get_param("name") == "a;b.txt"
    assert message.get_content_charset() == "utf-8"


def test_an_open_quote_before_millions_of_semicolons_is_one_parameter() -> None:
    """3,000,000 ';' after an open quote: the standard library's splitter takes about
    a second for 30,000 and grows with the square (hours here, far past the test's
    timeout); this one reads them once."""
    header = 'application/octet-stream; name="a.bin"; y="' + ";" * 3_000_000
    params = mimeparams.parseparam(header)
    assert params == ["application/octet-stream", 'name="a.bin"', 'y="' + ";" * 3_000_000]
    escaped = 'x; y="' + '\\";' * 1_000_000
    assert len(mimeparams.parseparam(escaped)) == 2
