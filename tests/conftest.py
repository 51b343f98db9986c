"""Shared test helpers: where the read-only reference vectors live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared folder: ``$SELVA_SHARED`` if set, else ``<repo root>/../shared``."""
    env = os.environ.get("SELVA_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official reference-vector directory; tests that need it skip when it is absent."""
    path = shared_dir() / "reference"
    if not (path / "cases.json").is_file():
        if os.environ.get("CI"):  # CI always has ../shared: a missing folder is a broken set-up, not a skip
            pytest.fail(f"reference vectors not found at {path}")
        pytest.skip(f"reference vectors not found at {path} (set SELVA_SHARED to the shared folder)")
    return path
