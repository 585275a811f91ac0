"""The console in a real browser: the system's Chromium driven by Playwright, against the service
stack of ``tests/service`` (its fixtures, reused: Postgres, Redis, a Celery worker, a uvicorn API)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import (  # noqa: F401  (fixtures and the log hook, shared)
    Service,
    fake_llm,
    pg_database,
    pytest_runtest_makereport,
    redis_broker,
    service,
)
from tests.service.helpers import REPO, api_process

# Where the tests leave a screenshot of each page (gitignored); LAFTER_CONSOLE_SCREENSHOTS moves it.
SCREENSHOTS = Path(os.environ.get("LAFTER_CONSOLE_SCREENSHOTS", REPO / "tests" / "console" / "screenshots"))


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
def auth_off_url(service: Service) -> Iterator[str]:  # noqa: F811  (the imported fixture)
    """A second API on the same database and broker (so the same worker) with auth off: the
    embedded mode's single user, who never sees a key prompt."""
    env = {**service.env, "LAFTER_AUTH": "off", "LAFTER_DEFAULT_OWNER_ID": "console-single-user"}
    with api_process(env, service.logs / "api-auth-off.log") as url:
        yield url
