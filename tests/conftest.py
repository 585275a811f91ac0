"""Shared test setup, kept light: one intra-op thread per process (2-core CI box)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

# The files that take longest (measured on the 2-core box, tens of seconds each), longest first. They
# run first so that the two test processes of ``scripts/test`` (pytest-xdist, whole files to each,
# ``--no-loadscope-reorder`` keeps this order) are left with the short files to share out at the end
# and finish together.
LONGEST_FIRST = [
    "tests/service/test_embedded.py",
    "tests/service/test_crash.py",
    "tests/service/test_fuzz.py",
    "tests/service/test_auth.py",
    "tests/service/test_webhooks.py",
    "tests/service/console/test_console.py",
    "tests/service/test_job_stream.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable
