"""Fixtures for the unit tests of guardproxy's pure modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
