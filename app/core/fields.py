"""Field types for request bodies: what a value must be for the database to store it at all.

Found by fuzzing (tests/service/test_fuzz.py): PostgreSQL text cannot hold NUL characters, and JSON
cannot hold NaN or Infinity (which Python's JSON parser accepts, and ``1e999`` becomes). Either
reached the database as a 500; with these types it is a 422 naming the field.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    return value


def _finite_json(value: dict[str, Any]) -> dict[str, Any]:
    # Iterative: the nesting depth is the client's choice.
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{path.lstrip('.') or 'value'}: numbers must be finite (not NaN or Infinity)")
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}", v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}", v) for i, v in enumerate(item))
    return value


# A string stored in (or looked up by) a text column.
Text = Annotated[str, AfterValidator(_no_nul)]
# A free-form JSON object stored in a JSON column (``metadata``).
JsonObject = Annotated[dict[str, Any], AfterValidator(_finite_json)]
