"""The urlencoded form parser's fast path (ASCII bodies) against the standard
library's ``parse_qsl``, which it replaces for them: same fields, same values,
same refusals, on generated forms biased towards what parsing is about."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.errors import Rejected
from ingest.sdk import parse_form

# Form syntax, percent-escapes (valid, truncated, non-hex, of invalid UTF-8) and
# plain ASCII, control characters included.
_PIECES = st.one_of(
    st.sampled_from(
        ["&", "=", "+", "%", "%2B", "%20", "%C3%A9", "%E2%82", "%zz", "%4", "&&", "=="]
    ),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=6),
)
_FORMS = st.lists(_PIECES, max_size=40).map("".join)


def _reference(text: str, max_fields: int) -> dict[str, str] | str:
    try:
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields))
    except ValueError:
        return "too many fields"


def _ours(body: bytes, max_fields: int, errors: str) -> dict[str, str] | str:
    try:
        return parse_form(body, max_fields=max_fields, max_field_bytes=10**6, errors=errors)
    except Rejected as exc:
        return "too many fields" if exc.status == 413 else f"refused {exc.status}"


@settings(max_examples=3000, deadline=None)
@given(_FORMS, st.integers(min_value=1, max_value=12), st.sampled_from(["strict", "replace"]))
def test_the_ascii_fast_path_parses_as_parse_qsl_does(
    text: str, max_fields: int, errors: str
) -> None:
    assert _ours(text.encode(), max_fields, errors) == _reference(text, max_fields)


def test_a_real_twilio_form_and_a_non_ascii_one() -> None:
    form = {"From": "+14155550100", "Body": "Hé, 50% off? a&b=c", "NumMedia": "0", "": "x"}
    body = urlencode(form).encode()
    assert body.isascii()
    assert parse_form(body, max_fields=200, max_field_bytes=1000) == form
    raw = "Body=Hé+là&From=%2B1".encode()  # not ASCII: the standard library's path
    assert parse_form(raw, max_fields=200, max_field_bytes=1000) == {
        "Body": "Hé là",
        "From": "+1",
    }


@pytest.mark.parametrize("body", [b"", b"&", b"a", b"a=", b"=b", b"a=1&a=2"])
def test_edges(body: bytes) -> None:
    assert parse_form(body, max_fields=5, max_field_bytes=10) == dict(
        parse_qsl(body.decode(), keep_blank_values=True)
    )
