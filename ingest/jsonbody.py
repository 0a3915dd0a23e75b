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


def _finite_float(text: str) -> float:
    # Python reads 1e999999 as inf; no sender means that, and "inf" in a
    # customer's message would be a silent corruption.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def load_json(data: bytes | str, what: str = "the body") -> object:
    """``data`` as JSON; NormalizeError('malformed') for anything that is not JSON,
    holds NaN, Infinity or an infinite number, or nests deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(data, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError as exc:
        raise NormalizeError("malformed", f"{what}: the JSON is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise NormalizeError("malformed", f"{what} is not valid JSON: {exc}") from exc
    if deeper_than(value, MAX_JSON_DEPTH):
        raise NormalizeError(
            "malformed", f"{what}: the JSON is nested too deeply (over {MAX_JSON_DEPTH} levels)"
        )
    return value


def deeper_than(value: object, limit: int) -> bool:
    """Whether a parsed JSON value nests more than ``limit`` levels (iteratively)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False
