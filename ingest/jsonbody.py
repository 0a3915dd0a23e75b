"""JSON from strangers, read once and bounded: every route that parses a JSON body or
field calls :func:`load_json`, so none of them can answer 500 to a payload.

``json.loads`` itself goes about 1,000 levels deep before ``RecursionError`` (not a
``ValueError``: it escaped the callers' handlers); everything after it that walks the
payload recursively (stripping controls, pydantic, the event's JSON) has less room. A
payload 500-989 deep parsed and then raised ``RecursionError`` in the normalizer: a 500
with a 170 KB traceback in the log (attacker review, 2026-11-30). No form, backend or
provider nests anywhere near :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import json
import math

from normalize.errors import NormalizeError

MAX_JSON_DEPTH = 64
#: Objects and arrays in one JSON document. Every container costs Python walks after
#: the parse (the depth check, stripping controls, the normalizer): 1 MB of 95,000
#: small objects took 0.7-0.9 s of the event loop's thread, and four addresses
#: posting 20 each to a public form held `switchboard run` (every channel, the queue)
#: for half a minute (attacker review, 2026-12-02). A form, a backend's event or a
#: provider's mail holds a few dozen.
MAX_JSON_CONTAINERS = 10_000
#: Values (members and items, at any depth) in one document: 120,000 keys in one
#: object, or 250,000 strings in one array, took 0.24-0.53 s past the container limit
#: (review of it, 2026-12-02).
MAX_JSON_VALUES = 100_000


def _finite_float(text: str) -> float:
    # Python reads 1e999999 as inf; no sender means that, and "inf" in a
    # customer's message would be a silent corruption.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


#: One decoder for every document: ``json.loads`` with hooks builds a new one a call
#: (2 of a small hook body's 7 µs, 2026-12-02).
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def _text(data: bytes | str) -> str:
    """What ``json.loads`` decodes: bytes in the encoding their first bytes show
    (UTF-8, 16 or 32), encoded surrogates let through; text without a UTF-8 BOM."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        return data
    return data.decode(json.detect_encoding(data), "surrogatepass")


def _within_limits(data: bytes | str) -> bool:
    """True when ``data`` cannot pass any shape limit, so its walk can be skipped:
    each object or array opens with a bracket (one byte ``{`` or ``[`` in any of
    JSON's encodings; a bracket inside a string only counts one too many), which
    bounds the depth and the containers; and each value takes at least a byte."""
    if isinstance(data, str):
        brackets = data.count("{") + data.count("[")
    else:
        brackets = data.count(b"{") + data.count(b"[")
    return brackets <= MAX_JSON_DEPTH and len(data) <= MAX_JSON_VALUES


def load_json(data: bytes | str, what: str = "the body") -> object:
    """``data`` as JSON; NormalizeError('malformed') for anything that is not JSON,
    holds NaN, Infinity or an infinite number, nests deeper than MAX_JSON_DEPTH or
    holds more than MAX_JSON_CONTAINERS objects and arrays or MAX_JSON_VALUES values."""
    try:
        value = _DECODER.decode(_text(data))
    except RecursionError as exc:
        raise NormalizeError("malformed", f"{what}: the JSON is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise NormalizeError("malformed", f"{what} is not valid JSON: {exc}") from exc
    if _within_limits(data):
        return value
    refusal = _shape_refusal(value)
    if refusal is not None:
        raise NormalizeError("malformed", f"{what}: the JSON {refusal}")
    return value


def _shape_refusal(value: object) -> str | None:
    """Why a parsed document is refused (too deep, too many containers), or None: one
    walk, which stops at the first limit passed."""
    if not isinstance(value, dict | list):
        return None
    stack: list[tuple[dict[str, object] | list[object], int]] = [(value, 1)]
    seen = values = 0
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"is nested too deeply (over {MAX_JSON_DEPTH} levels)"
        seen += 1
        if seen > MAX_JSON_CONTAINERS:
            return f"holds more than {MAX_JSON_CONTAINERS:,} objects and arrays"
        values += len(item)
        if values > MAX_JSON_VALUES:
            return f"holds more than {MAX_JSON_VALUES:,} values"
        children = item.values() if isinstance(item, dict) else item
        stack.extend((v, depth + 1) for v in children if isinstance(v, dict | list))
    return None
