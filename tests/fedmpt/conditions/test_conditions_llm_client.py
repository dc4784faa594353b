"""Tests of the chat-completions client against the loopback stub server."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest

from fedmpt.conditions.llm_client import (
    ChatClient,
    ChatClientConfig,
    LLMHTTPError,
    LLMResponseError,
    LLMUnavailableError,
    RetryPolicy,
    chat_completions_url,
)
from fedmpt.errors import ConfigError

from .llm_stub_server import StubLLM, fixture_text

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Describe a cat."}]
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05, jitter=0.5)
KEY = "sk-test-very-secret-123"


def _client(url: str, *, env: dict[str, str] | None = None, **kw: object) -> tuple[ChatClient, list[float]]:
    sleeps: list[float] = []
    settings: dict[str, object] = {"endpoint": url, "model": "stub-model", "timeout_s": 2.0, "retry": FAST}
    settings.update(kw)
    config = ChatClientConfig(**settings)  # type: ignore[arg-type]
    client = ChatClient(config, rng=np.random.default_rng(7), sleep=sleeps.append, environ=env or {})
    return client, sleeps


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8000/v1/chat/completions"),
        ("https://api.example.org/openai/v1", "https://api.example.org/openai/v1/chat/completions"),
        ("https://api.example.org/proxy", "https://api.example.org/proxy/v1/chat/completions"),
    ],
)
def test_endpoint_normalisation(endpoint: str, expected: str) -> None:
    assert chat_completions_url(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["ftp://host/v1", "127.0.0.1:8000", "http:///v1", "http://h/v1?key=1"])
def test_bad_endpoints_are_rejected(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="LLM endpoint"):
        chat_completions_url(endpoint)


def test_successful_request_body_and_auth(llm_stub: StubLLM, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, sleeps = _client(llm_stub.url + "/v1/", env={"OPENAI_API_KEY": KEY}, temperature=0.3, seed=11)
    answer = client.complete(MESSAGES)
    assert answer.content == fixture_text("stage1_answer.txt")
    assert answer.model == "stub-model"
    assert answer.attempts == 1
    assert sleeps == []
    (request,) = llm_stub.requests
    assert request.path == "/v1/chat/completions"
    assert request.body == {
        "model": "stub-model",
        "messages": MESSAGES,
        "temperature": 0.3,
        "seed": 11,
        "stream": False,
    }
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(client)
    assert KEY not in caplog.text


def test_no_key_no_auth_header(llm_stub: StubLLM) -> None:
    client, _ = _client(llm_stub.url, seed=None, max_tokens=64)
    client.complete(MESSAGES)
    (request,) = llm_stub.requests
    assert "Authorization" not in request.headers
    assert "seed" not in request.body
    assert request.body["max_tokens"] == 64


def test_retries_5xx_and_429_with_seeded_backoff(llm_stub: StubLLM) -> None:
    llm_stub.script.extend(["500", "429"])
    client, sleeps = _client(llm_stub.url)
    answer = client.complete(MESSAGES)
    assert answer.attempts == 3
    assert llm_stub.count == 3
    # Independent recomputation: the same seed gives the same jitter draws u_0, u_1.
    u = np.random.default_rng(7).uniform(-1.0, 1.0, size=2)
    first = 0.01 * (1 + 0.5 * u[0])
    second = min(0.05, max(0.02 * (1 + 0.5 * u[1]), 0.05))  # Retry-After: 0.05 raises the wait to 0.05
    assert sleeps == pytest.approx([first, second])


def test_gives_up_after_max_attempts(llm_stub: StubLLM) -> None:
    llm_stub.script.extend(["500"] * 5)
    client, sleeps = _client(llm_stub.url)
    with pytest.raises(LLMUnavailableError, match="3 attempts failed; last error: HTTP 500"):
        client.complete(MESSAGES)
    assert llm_stub.count == 3
    assert len(sleeps) == 2


def test_other_4xx_is_not_retried(llm_stub: StubLLM) -> None:
    llm_stub.script.append("404")
    client, sleeps = _client(llm_stub.url)
    with pytest.raises(LLMHTTPError, match="HTTP 404.*model not found") as info:
        client.complete(MESSAGES)
    assert info.value.status == 404
    assert llm_stub.count == 1
    assert sleeps == []


def test_redirects_are_not_followed(llm_stub: StubLLM) -> None:
    llm_stub.script.append("redirect")
    client, sleeps = _client(llm_stub.url, env={"OPENAI_API_KEY": KEY})
    with pytest.raises(LLMHTTPError, match="redirects \\(HTTP 307\\).*not followed") as info:
        client.complete(MESSAGES)
    assert info.value.status == 307
    assert llm_stub.count == 1
    assert KEY not in str(info.value)


def test_seed_rejected_is_resent_without_seed(llm_stub: StubLLM) -> None:
    llm_stub.script.append("seed400")
    client, sleeps = _client(llm_stub.url, seed=3)
    assert client.complete(MESSAGES).attempts == 1
    assert [("seed" in r.body) for r in llm_stub.requests] == [True, False]
    assert sleeps == []


def test_timeouts_are_retried_then_reported(llm_stub: StubLLM) -> None:
    llm_stub.script.extend(["slow", "slow"])
    llm_stub.slow_s = 1.0
    client, sleeps = _client(llm_stub.url, timeout_s=0.2, retry=RetryPolicy(max_attempts=2, base_delay_s=0.0))
    with pytest.raises(LLMUnavailableError, match="timed out after 0.2 s"):
        client.complete(MESSAGES)
    assert llm_stub.count == 2


def test_timeout_then_success(llm_stub: StubLLM) -> None:
    llm_stub.script.append("slow")
    client, _ = _client(llm_stub.url, timeout_s=0.2)
    assert client.complete(MESSAGES).attempts == 2


@pytest.mark.parametrize(("mode", "fragment"), [("badjson", "not JSON"), ("noshape", "without choices")])
def test_malformed_bodies_raise_clear_errors(llm_stub: StubLLM, mode: str, fragment: str) -> None:
    llm_stub.script.append(mode)
    client, _ = _client(llm_stub.url)
    with pytest.raises(LLMResponseError, match=fragment):
        client.complete(MESSAGES)
    assert llm_stub.count == 1


def test_connection_refused_is_retried() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client, sleeps = _client(f"http://127.0.0.1:{port}")
    with pytest.raises(LLMUnavailableError, match="connection error"):
        client.complete(MESSAGES)
    assert len(sleeps) == FAST.max_attempts - 1


def test_api_key_refused_over_plain_http_to_remote_host(caplog: pytest.LogCaptureFixture) -> None:
    config = ChatClientConfig(endpoint="http://llm.example.org/v1", model="m")
    with pytest.raises(ConfigError, match="refusing to send the API key") as info:
        ChatClient(config, rng=np.random.default_rng(0), environ={"OPENAI_API_KEY": KEY})
    assert KEY not in str(info.value)
    insecure = ChatClientConfig(endpoint="http://llm.example.org/v1", model="m", allow_insecure_http=True)
    caplog.set_level(logging.WARNING)
    ChatClient(insecure, rng=np.random.default_rng(0), environ={"OPENAI_API_KEY": KEY})
    assert "plain http" in caplog.text and KEY not in caplog.text
    # https, or no key at all, is fine.
    ChatClient(ChatClientConfig(endpoint="https://llm.example.org", model="m"), rng=np.random.default_rng(0))
    ChatClient(config, rng=np.random.default_rng(0), environ={})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": " "},
        {"temperature": -0.1},
        {"timeout_s": 0},
        {"max_tokens": 0},
        {"api_key_env": "BAD-NAME"},
    ],
)
def test_bad_client_config(kwargs: dict[str, object]) -> None:
    settings: dict[str, object] = {"endpoint": "http://127.0.0.1:1", "model": "m"}
    settings.update(kwargs)
    with pytest.raises(ConfigError):
        ChatClientConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"base_delay_s": -1.0}, {"max_delay_s": 0.5, "base_delay_s": 1.0}, {"jitter": 1.0}],
)
def test_bad_retry_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_delays_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=1.0, max_delay_s=8.0, jitter=0.25)
    rng = np.random.default_rng(0)
    for k in range(8):
        nominal = min(8.0, 2.0**k)
        delay = policy.delay(k, rng)
        assert nominal * 0.75 <= delay <= nominal * 1.25
