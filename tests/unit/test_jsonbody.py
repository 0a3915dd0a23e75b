"""Shortcuts on a hook's JSON body: the shape walk skipped when no limit can be
passed, and the control-character walk skipped when no string can need it. Each
must give what the full walk gives, for any document."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.jsonbody import MAX_JSON_DEPTH, _shape_refusal, _within_limits, load_json
from normalize.errors import NormalizeError
from normalize.schema import json_needs_no_stripping, strip_controls_deep

# Strings with what the walks care about: controls, lone surrogates, non-ASCII,
# backslashes and brackets inside strings.
_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(["\x00", "\x07", "\t", "\n", "\\", "{", "[", "é", "€", "\ud83d", "😀"]),
        st.characters(codec="utf-8"),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    ),
    max_size=12,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)


def _encodings(value: object) -> list[bytes]:
    """The document as a sender may send it: escaped ASCII, raw UTF-8 (encoded
    surrogates let through, as some backends do), UTF-16 and UTF-32."""
    text = json.dumps(value, ensure_ascii=False)
    return [
        json.dumps(value).encode(),
        text.encode("utf-8", "surrogatepass"),
        text.encode("utf-16-le", "surrogatepass"),
        text.encode("utf-32", "surrogatepass"),
    ]


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_a_body_that_needs_no_stripping_is_what_stripping_gives(value: object) -> None:
    for data in _encodings(value):
        try:
            parsed = json.loads(data)
        except ValueError:
            continue  # not JSON as sent: refused before any walk
        if json_needs_no_stripping(data):
            assert strip_controls_deep(parsed) == parsed, data


@pytest.mark.parametrize(
    ("data", "clean"),
    [
        (b'{"text": "hello"}', True),
        ('{"text": "Grüße €"}'.encode(), True),
        (b'{"text": "a\\u0000b"}', False),  # an escaped control
        (b'{"text": "a\\\\b"}', False),  # any backslash: judged the long way
        (b'{"text": "a\xed\xa0\xbdb"}', False),  # an encoded lone surrogate
        ('{"text": "x"}'.encode("utf-16-le"), False),  # not UTF-8
        # UTF-16 whose bytes pass as UTF-8 with a lone surrogate in them.
        ('{"t": "\ud800\u0080"}'.encode("utf-16-le", "surrogatepass"), False),
    ],
)
def test_which_bodies_need_no_stripping(data: bytes, clean: bool) -> None:
    assert json_needs_no_stripping(data) is clean


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_load_json_reads_what_json_loads_reads(value: object) -> None:
    for data in _encodings(value):
        try:
            expected = json.loads(data)
        except ValueError:
            with pytest.raises(NormalizeError):
                load_json(data)
            continue
        assert load_json(data) == expected
        assert load_json(data.decode(json.detect_encoding(data), "surrogatepass")) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=3 * MAX_JSON_DEPTH), st.booleans())
def test_the_shape_walk_is_skipped_only_where_it_would_pass(depth: int, in_strings: bool) -> None:
    nested = "[" * depth + "]" * depth
    document = json.dumps({"a": nested}) if in_strings else '{"a": ' + nested + "}"
    value = json.loads(document)
    if _within_limits(document) or _within_limits(document.encode("utf-16")):
        assert _shape_refusal(value) is None
    if _shape_refusal(value) is None:
        assert load_json(document) == value
    else:
        with pytest.raises(NormalizeError, match="nested too deeply"):
            load_json(document)


def test_a_document_one_level_too_deep_is_refused_however_small() -> None:
    too_deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH  # inside {"a": ...}
    with pytest.raises(NormalizeError, match="nested too deeply"):
        load_json('{"a": ' + too_deep + "}")
    assert load_json('{"a": ' + too_deep[1:-1] + "}") is not None
    # The same brackets inside a string: counted, so walked, and fine.
    assert load_json(json.dumps({"a": too_deep})) == {"a": too_deep}


def test_a_text_with_a_byte_order_mark_is_refused_as_json_loads_refuses_it() -> None:
    with pytest.raises(NormalizeError, match="BOM"):
        load_json('\ufeff{"a": 1}')
    assert load_json('{"a": 1}'.encode("utf-8-sig")) == {"a": 1}
