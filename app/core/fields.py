"""Field types for request bodies: what a value must be for the database to store it at all.

Found by fuzzing (tests/service/test_fuzz.py): PostgreSQL text cannot hold NUL characters, and JSON
cannot hold NaN or Infinity (which Python's JSON parser accepts, and ``1e999`` becomes). Either
reached the database as a 500; with these types it is a 422 naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import AfterValidator

# How deep a free-form JSON value (``metadata``) may nest: deeper values cannot be stored or served
# without recursing that deep, and nothing a client means needs more.
MAX_JSON_DEPTH = 32
# How large it may be, as compact JSON: it is stored in a row and sent back in every listing.
MAX_JSON_BYTES = 16 * 1024


def parse_json(raw: str) -> Any:
    """``json.loads`` for a JSON text from a client (a form field): nesting deeper than the parser
    can follow (``[[[[...]]]]`` 100,000 deep) is a ``ValueError`` like any other malformed JSON, not a
    ``RecursionError`` that ends as a 500."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    return value


def _scalar_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


def _storable_json(value: dict[str, Any]) -> dict[str, Any]:
    """Finite numbers, at most ``MAX_JSON_DEPTH`` levels, at most ``MAX_JSON_BYTES`` as compact JSON.
    Iterative (the nesting depth is the client's choice), and it stops at the first limit crossed."""
    size = 0
    stack: list[tuple[str, int, Any]] = [("", 1, value)]
    while stack:
        path, depth, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{path.lstrip('.') or 'value'}: numbers must be finite (not NaN or Infinity)")
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            size += 2 + max(len(item) - 1, 0) + len(item)  # braces, commas, colons
            size += sum(_scalar_bytes(str(k)) for k in item)
            stack.extend((f"{path}.{k}", depth + 1, v) for k, v in item.items())
        elif isinstance(item, list):
            size += 2 + max(len(item) - 1, 0)
            stack.extend((f"{path}.{i}", depth + 1, v) for i, v in enumerate(item))
        else:
            size += _scalar_bytes(item)
        if size > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES} bytes as JSON (UTF-8, no spaces)")
    return value


# A string stored in (or looked up by) a text column.
Text = Annotated[str, AfterValidator(_no_nul)]
# A free-form JSON object stored in a JSON column (``metadata``): finite, at most 32 levels deep and
# 16 KB as JSON.
JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]
