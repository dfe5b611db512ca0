"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from tests.conftest import TENANT_KEY

Sdk = Callable[[str], openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """openai clients for a proxy URL, as acme, without retries; closed after the test, so that no
    pooled socket is left for the garbage collector to warn about in a later test."""
    clients: list[openai.OpenAI] = []

    def make(url: str) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()
