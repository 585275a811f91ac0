"""Time-ordered, prefixed ids (``job_0193a...``): sortable, so ids double as pagination cursors."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    millis = int(time.time() * 1000)
    return f"{prefix}_{millis:012x}{secrets.token_hex(8)}"
