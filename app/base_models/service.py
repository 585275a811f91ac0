"""Which base models this deployment can use, and checking a ``base_model`` before it is used.

The set of usable models is explicit (``allowed``): open_clip's pretrained tags, files inside the
configured local model folders (``LAFTER_LOCAL_MODEL_DIRS``), ``ARCH::random`` where
``LAFTER_ALLOW_RANDOM_WEIGHTS`` allows it, and files anywhere only where an operator allows it
(``LAFTER_ALLOW_ANY_MODEL_PATH``, refused in production). The check is lexical first: a path outside
the folders is refused before the file system is asked anything about it, with one message whatever
the path, so a refusal says nothing about which server files exist. Nothing here downloads.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import open_clip
from open_clip.pretrained import get_pretrained_cfg

from app.core.errors import Invalid
from app.core.settings import Settings
from lafter.backbone import CHECKPOINT_SUFFIXES, RANDOM, list_base_models, parse_spec
from lafter.errors import LafterError

NOT_ALLOWED = "base_model_not_allowed"
# One message for every path outside the local model folders, whether it exists or not.
PATH_NOT_ALLOWED = (
    "base_model names a file outside this deployment's local model folders (LAFTER_LOCAL_MODEL_DIRS); "
    "use a spec listed by GET /v1/base-models"
)
# open_clip's schemes that fetch from a model hub or read a folder of the caller's choosing.
SCHEMES = ("hf-hub:", "local-dir:")


@lru_cache(maxsize=8)
def _listing(local_dirs: tuple[Path, ...]) -> list[dict[str, Any]]:
    return list_base_models(list(local_dirs))


def model_dirs(settings: Settings) -> tuple[Path, ...]:
    """The local model folders, absolute and with symlinks resolved (a folder may be a link)."""
    return tuple(Path(os.path.realpath(d)) for d in settings.local_model_dirs)


def available(settings: Settings, *, refresh: bool = False) -> list[dict[str, Any]]:
    if refresh:
        _listing.cache_clear()
    return _listing(model_dirs(settings))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def path_allowed(path: str, settings: Settings) -> bool:
    """True when ``path`` is a file this deployment may load: absolute, no ``..``, inside one of the
    local model folders both as written and once symlinks are resolved. The file system is asked
    (to resolve links) only about a path that is already inside a folder as written."""
    if settings.allow_any_model_path:
        return True
    if "\x00" in path or not os.path.isabs(path) or ".." in PurePosixPath(path).parts:
        return False
    written = os.path.normpath(path)
    folders = [(os.path.normpath(os.path.abspath(d)), os.path.realpath(d)) for d in settings.local_model_dirs]
    if not any(_within(written, lexical) or _within(written, real) for lexical, real in folders):
        return False
    try:
        real = os.path.realpath(written)
    except (OSError, ValueError):
        return False
    return any(_within(real, resolved) for _, resolved in folders)


def _refuse(message: str, field: str, code: str = NOT_ALLOWED) -> Invalid:
    return Invalid(message, code=code, field=field)


def allowed(spec: str, settings: Settings, *, field: str = "base_model") -> None:
    """Refuse a spec outside the deployment's set of models (``Invalid``). Offline and cheap: it reads
    open_clip's built-in lists and, for a path inside a local model folder, resolves its links."""
    if "\x00" in spec:
        raise _refuse("base_model must not contain NUL characters", field, "base_model_invalid")
    left, sep, right = (part.strip() for part in spec.partition("::"))
    if not sep or not left or not right:
        return  # not a spec at all: parse_spec says why, without touching the file system
    if left.lower().startswith(SCHEMES) or right.lower().startswith(SCHEMES):
        raise _refuse(
            "model hub and folder schemes (hf-hub:, local-dir:) are not served: download the model "
            "elsewhere and put it in a local model folder (LAFTER_LOCAL_MODEL_DIRS), or use an open_clip "
            "pretrained tag such as 'ViT-B-32::openai'",
            field,
        )
    arch: str | None = None
    if left.endswith(".json"):
        if not path_allowed(left, settings):
            raise _refuse(PATH_NOT_ALLOWED, field)
    else:
        arch = left.replace("/", "-")
        if arch not in open_clip.list_models():
            raise _refuse(
                f"unknown architecture {left[:100]!r}; GET /v1/base-models lists the models of this deployment",
                field,
                "base_model_invalid",
            )
        vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
        if "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
            raise _refuse(
                f"{left[:100]!r} has a {vision.get('timm_model_name') or 'ResNet'} image tower; LaFTer needs "
                "an open_clip ViT image tower (its visual prompts are transformer tokens)",
                field,
                "unsupported_architecture",
            )
    if right == RANDOM:
        if not settings.allow_random_weights:
            raise _refuse(
                f"{spec!r} has random weights; set LAFTER_ALLOW_RANDOM_WEIGHTS=true to allow them (tests only)",
                field,
            )
        return
    if arch is not None and get_pretrained_cfg(arch, right) != {}:
        return  # a pretrained tag open_clip lists
    if os.sep not in right and not right.endswith(CHECKPOINT_SUFFIXES):
        tags = open_clip.list_pretrained_tags_by_model(arch) if arch else []
        raise _refuse(
            f"{right[:100]!r} is neither a pretrained tag of {left[:100]!r} "
            f"(known: {', '.join(tags) or 'none'}) nor a checkpoint file",
            field,
            "base_model_invalid",
        )
    if not path_allowed(right, settings):
        raise _refuse(PATH_NOT_ALLOWED, field)


def validate_spec(spec: str, settings: Settings, *, field: str = "base_model") -> str:
    """Cheap, offline checks (no weights are loaded, nothing is downloaded): the spec is one this
    deployment allows (``allowed``), it parses, and the files it names in a local model folder exist."""
    spec = spec.strip()
    allowed(spec, settings, field=field)
    try:
        parse_spec(spec)
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
    return spec
