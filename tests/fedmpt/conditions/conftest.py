"""Fixtures of the conditions tests: the loopback LLM stub server, always shut down in the finalizer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .llm_stub_server import StubLLM, running_stub


@pytest.fixture
def llm_stub() -> Iterator[StubLLM]:
    """A stub OpenAI-compatible server on 127.0.0.1 (see ``llm_stub_server``)."""
    with running_stub() as stub:
        yield stub
