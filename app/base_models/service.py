"""Which base models this deployment can use, and checking a job's ``base_model`` before queueing."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from app.core.errors import Invalid
from app.core.settings import Settings
from lafter.backbone import list_base_models, parse_spec
from lafter.errors import LafterError


@lru_cache(maxsize=8)
def _listing(local_dirs: tuple[Path, ...]) -> list[dict[str, Any]]:
    return list_base_models(list(local_dirs))


def available(settings: Settings, *, refresh: bool = False) -> list[dict[str, Any]]:
    if refresh:
        _listing.cache_clear()
    return _listing(tuple(settings.local_model_dirs))


def validate_spec(spec: str, settings: Settings, *, field: str = "base_model") -> str:
    """Cheap checks only (no weights are loaded): the spec parses, files it names exist, and random
    weights are refused unless the deployment allows them (tests, benchmarks)."""
    spec = spec.strip()
    try:
        parsed = parse_spec(spec)
    except LafterError as exc:
        raise Invalid(str(exc), code="base_model_invalid", field=field) from exc
    except (OSError, ValueError) as exc:
        # A path the file system refuses to look at (name too long, ...): found by fuzzing.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise Invalid(
            f"base model {spec[:200]!r} names a file that cannot be checked: {reason}",
            code="base_model_invalid",
            field=field,
        ) from exc
    if parsed.is_random and not settings.allow_random_weights:
        raise Invalid(
            f"{spec!r} has random weights; set LAFTER_ALLOW_RANDOM_WEIGHTS=true to allow them (tests only)",
            code="base_model_not_allowed",
            field=field,
        )
    return spec
