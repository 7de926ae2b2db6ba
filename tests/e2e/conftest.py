"""Fixtures of `make e2e`: the Kubernetes versions built, and a figures report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.peer import versions


@pytest.fixture(params=versions())
def version(request: pytest.FixtureRequest) -> str:
    """Each Kubernetes version whose device manager was built (newest, oldest)."""
    return str(request.param)


def report(line: str) -> None:
    """A figure for `make e2e` to print after the tests (the tests assert, never time)."""
    path = os.environ.get("AIODP_E2E_REPORT")
    if path:
        with Path(path).open("a") as f:
            f.write(line + "\n")
