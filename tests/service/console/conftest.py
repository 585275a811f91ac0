"""The console in a real browser: the system's Chromium driven by Playwright, against the service
stack of ``tests/service/conftest.py`` (the same session's one: Postgres, Redis, a Celery worker, a
uvicorn API). These tests live under ``tests/service`` so that they share that stack: a second
stack on the same broker would have its worker take the first one's jobs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import Service
from tests.service.helpers import REPO, api_process

# Where the tests leave a screenshot of each page (gitignored); LAFTER_CONSOLE_SCREENSHOTS moves it.
SCREENSHOTS = Path(
    os.environ.get("LAFTER_CONSOLE_SCREENSHOTS", REPO / "tests" / "service" / "console" / "screenshots")
)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on this machine: apt-get install -y chromium (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        # The system's Chromium: Playwright's own browser download cannot run on these machines.
        chromium = pw.chromium.launch(executable_path=path, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {SCREENSHOTS}")
    return SCREENSHOTS


@pytest.fixture(scope="session")
def auth_off_url(service: Service) -> Iterator[str]:
    """A second API on the same database and broker (so the same worker) with auth off: the
    embedded mode's single user, who never sees a key prompt."""
    env = {**service.env, "LAFTER_AUTH": "off", "LAFTER_DEFAULT_OWNER_ID": "console-single-user"}
    with api_process(env, service.logs / "api-auth-off.log") as url:
        yield url
