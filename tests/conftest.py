"""Shared pytest setup: no test may reach the network; fixtures for the repository and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub are imported by any test module, so nothing can download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (read-only real data sets); skips the test when it is absent."""
    path = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip("../shared/data is absent")
    return path
