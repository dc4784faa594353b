"""A minimal client for OpenAI-compatible chat-completions endpoints, on the standard library only.

It POSTs ``{"model", "messages", "temperature", "seed"?, "max_tokens"?}`` to ``{base}/chat/completions`` and
returns the first choice's message content. The base URL may be given with or without the ``/v1`` suffix or
with the full ``/chat/completions`` path (``http://127.0.0.1:11434``, ``http://127.0.0.1:8000/v1`` and
``http://127.0.0.1:8080/v1/chat/completions`` all work), so local servers (vLLM, llama.cpp, Ollama) and hosted
ones are reached alike.

Failure policy: HTTP 429, HTTP 5xx, timeouts and connection errors are retried with exponential backoff
``delay_k = min(max_delay, base_delay * 2**k) * (1 + jitter * u_k)``, ``u_k ~ U(-1, 1)`` drawn from an
explicit ``numpy.random.Generator`` (a ``Retry-After`` header on a 429 raises the delay to at least its value,
capped at ``max_delay``); any other 4xx is raised at once, as is a 2xx body that is not JSON or not shaped
like a chat completion. Threat model for the API key: it is read from an environment variable, sent only in
the ``Authorization: Bearer`` header (redirects are not followed, so it cannot be forwarded), never logged,
never put in an error message or in provenance, and hidden by ``__repr__``; by default it is refused over
plain ``http://`` to a host that is not loopback.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from fedmpt.errors import ConfigError, FedMPTError

__all__ = [
    "ChatClient",
    "ChatClientConfig",
    "ChatCompletion",
    "LLMError",
    "LLMHTTPError",
    "LLMResponseError",
    "LLMUnavailableError",
    "RetryPolicy",
    "chat_completions_url",
]

logger = logging.getLogger(__name__)

_BODY_SNIPPET_CHARS = 500


class LLMError(FedMPTError):
    """Base class of errors talking to the LLM endpoint."""


class LLMHTTPError(LLMError):
    """The endpoint answered with an HTTP error status that is not retried (4xx other than 429)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LLMResponseError(LLMError):
    """The endpoint answered 2xx with a body that is not JSON or not shaped like a chat completion."""


class LLMUnavailableError(LLMError):
    """Every attempt failed with a retryable error (429, 5xx, timeout, connection error)."""


class Role(StrEnum):
    """Chat message roles used by the pipeline."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for retryable failures.

    ``max_attempts`` counts the first try (1 = no retry). The k-th retry (k = 0, 1, ...) waits
    ``min(max_delay_s, base_delay_s * 2**k) * (1 + jitter * u)``, ``u ~ U(-1, 1)``.
    """

    max_attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"RetryPolicy.max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if not self.base_delay_s >= 0:
            raise ConfigError(f"RetryPolicy.base_delay_s must be >= 0, got {self.base_delay_s!r}")
        if not self.max_delay_s >= self.base_delay_s:
            raise ConfigError(
                f"RetryPolicy.max_delay_s must be >= base_delay_s ({self.base_delay_s}), got {self.max_delay_s!r}"
            )
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, retry_index: int, rng: np.random.Generator) -> float:
        """Seconds to wait before retry number ``retry_index`` (0-based)."""
        base = min(self.max_delay_s, self.base_delay_s * 2.0**retry_index)
        return float(base * (1.0 + self.jitter * rng.uniform(-1.0, 1.0)))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def chat_completions_url(endpoint: str) -> str:
    """The ``.../chat/completions`` URL for an endpoint given with or without ``/v1`` or the full path.

    Rule: strip trailing slashes; keep a URL ending in ``/chat/completions``; append ``/chat/completions`` to
    a path whose last segment is a version (``v1``, ``v2``...); otherwise append ``/v1/chat/completions``.
    """
    parsed = urllib.parse.urlsplit(endpoint.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"LLM endpoint {endpoint!r} must be an http:// or https:// URL with a host")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"LLM endpoint {endpoint!r} must not carry a query string or fragment")
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        last = path.rsplit("/", 1)[-1]
        is_version = len(last) >= 2 and last[0] == "v" and last[1:].isdigit()
        path = path + ("/chat/completions" if is_version else "/v1/chat/completions")
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


@dataclass(frozen=True)
class ChatClientConfig:
    """Where and how to ask: endpoint, model, sampling settings, timeout, retries, API-key variable.

    ``seed`` is sent when not ``None`` (OpenAI, vLLM, llama.cpp and Ollama accept it; a server that rejects it
    with a 400 mentioning ``seed`` is asked again without it). ``allow_insecure_http`` permits sending the API
    key over plain HTTP to a non-loopback host; it is off by default and warned about when on.
    """

    endpoint: str
    model: str
    temperature: float = 0.0
    seed: int | None = 0
    max_tokens: int | None = None
    timeout_s: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    api_key_env: str = "OPENAI_API_KEY"
    allow_insecure_http: bool = False

    def __post_init__(self) -> None:
        chat_completions_url(self.endpoint)  # validates
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"LLM model name must be a non-empty string, got {self.model!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"LLM temperature must be in [0, 2], got {self.temperature!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"LLM max_tokens must be >= 1 or None, got {self.max_tokens!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"LLM timeout_s must be > 0, got {self.timeout_s!r}")
        if not self.api_key_env or not self.api_key_env.replace("_", "").isalnum():
            raise ConfigError(f"api_key_env must name an environment variable, got {self.api_key_env!r}")

    @property
    def url(self) -> str:
        """The full chat-completions URL."""
        return chat_completions_url(self.endpoint)


@dataclass(frozen=True)
class ChatCompletion:
    """One successful answer: the message ``content``, the ``model`` the server says it used, the attempts."""

    content: str
    model: str | None
    finish_reason: str | None
    attempts: int


class _Retryable(Exception):
    """Internal: a failure worth another attempt."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _SeedRejected(_Retryable):
    """Internal: the server refused the ``seed`` field; resend without it (not counted as an attempt)."""


def _snippet(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= _BODY_SNIPPET_CHARS else text[:_BODY_SNIPPET_CHARS] + "...[truncated]"


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: ignore and use our own backoff


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend the ``Authorization`` header to the new location."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None  # urllib then raises HTTPError with the 3xx status


class ChatClient:
    """Send chat-completion requests with retries; see the module docstring for the failure policy."""

    def __init__(
        self,
        config: ChatClientConfig,
        *,
        rng: np.random.Generator,
        sleep: Callable[[float], None] = time.sleep,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._rng = rng
        self._sleep = sleep
        env = os.environ if environ is None else environ
        key = env.get(config.api_key_env) or None
        self.__api_key = key
        self._seed_supported = config.seed is not None
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        parsed = urllib.parse.urlsplit(config.url)
        if key is not None and parsed.scheme == "http" and not _is_loopback(parsed.hostname or ""):
            if not config.allow_insecure_http:
                raise ConfigError(
                    f"refusing to send the API key from ${config.api_key_env} over plain http to "
                    f"{parsed.hostname!r}; use https, a loopback endpoint, or allow_insecure_http=True"
                )
            logger.warning("sending the API key over plain http to %s (allow_insecure_http is on)", parsed.hostname)

    def __repr__(self) -> str:
        key_state = "set" if self.__api_key else "unset"
        return f"ChatClient(url={self.config.url!r}, model={self.config.model!r}, api_key=<{key_state}>)"

    @property
    def model(self) -> str:
        """The model name sent with each request."""
        return self.config.model

    def _body(self, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "temperature": self.config.temperature,
            "stream": False,
        }
        if self._seed_supported and self.config.seed is not None:
            body["seed"] = self.config.seed
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        return body

    def _post_once(self, messages: Sequence[Mapping[str, str]]) -> bytes:
        data = json.dumps(self._body(messages), ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__api_key is not None:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        request = urllib.request.Request(self.config.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as response:
                payload: bytes = response.read()
                return payload
        except urllib.error.HTTPError as err:
            body = err.read() if err.fp is not None else b""
            status = err.code
            if status == 429 or 500 <= status <= 599:
                raise _Retryable(f"HTTP {status}: {_snippet(body)}", _retry_after(err.headers)) from err
            if status == 400 and self._seed_supported and b"seed" in body.lower():
                self._seed_supported = False
                logger.warning("endpoint rejected the 'seed' field; retrying without it: %s", _snippet(body))
                raise _SeedRejected("seed not supported") from err
            if 300 <= status <= 399:
                raise LLMHTTPError(
                    f"LLM endpoint {self.config.url} redirects (HTTP {status}) to "
                    f"{err.headers.get('Location')!r}; redirects are not followed (they would resend the API "
                    "key): give the final URL as the endpoint",
                    status,
                ) from err
            raise LLMHTTPError(
                f"LLM endpoint {self.config.url} answered HTTP {status}: {_snippet(body)}", status
            ) from err
        except TimeoutError as err:
            raise _Retryable(f"timed out after {self.config.timeout_s} s") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLError):
                # A certificate or TLS failure does not heal by waiting: report it at once.
                raise LLMUnavailableError(f"LLM endpoint {self.config.url}: TLS error: {err.reason}") from err
            if isinstance(err.reason, TimeoutError):
                raise _Retryable(f"timed out after {self.config.timeout_s} s") from err
            raise _Retryable(f"connection error: {err.reason}") from err
        except (ConnectionError, http.client.HTTPException) as err:
            raise _Retryable(f"connection error: {err!r}") from err

    def _parse(self, payload: bytes, attempts: int) -> ChatCompletion:
        where = f"LLM endpoint {self.config.url}"
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LLMResponseError(f"{where} answered with a body that is not JSON: {_snippet(payload)!r}") from err
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise LLMResponseError(
                f"{where} answered JSON without choices[0].message.content: {_snippet(json.dumps(data))}"
            ) from err
        if not isinstance(content, str):
            raise LLMResponseError(f"{where} answered a non-string message content: {content!r}")
        finish = choice.get("finish_reason") if isinstance(choice, Mapping) else None
        if finish == "length":
            logger.warning("LLM answer was cut at the token limit (finish_reason='length')")
        model = data.get("model") if isinstance(data, Mapping) else None
        return ChatCompletion(
            content=content,
            model=model if isinstance(model, str) else None,
            finish_reason=finish if isinstance(finish, str) else None,
            attempts=attempts,
        )

    def complete(self, messages: Sequence[Mapping[str, str]]) -> ChatCompletion:
        """Send one chat completion request (with retries) and return the first choice's content.

        Raises :class:`LLMHTTPError` (non-retryable status), :class:`LLMResponseError` (malformed body) or
        :class:`LLMUnavailableError` (all ``retry.max_attempts`` attempts failed with retryable errors).
        """
        if not messages:
            raise ConfigError("messages must hold at least one chat message")
        policy = self.config.retry
        reasons: list[str] = []
        retries = 0
        attempt = 0
        while True:
            attempt += 1
            try:
                payload = self._post_once(messages)
            except _SeedRejected:
                attempt -= 1  # dropping an unsupported field is not a failed attempt
                continue
            except _Retryable as err:
                reasons.append(str(err))
                if attempt >= policy.max_attempts:
                    raise LLMUnavailableError(
                        f"LLM endpoint {self.config.url}: {attempt} attempts failed; last error: {reasons[-1]}"
                    ) from err
                delay = policy.delay(retries, self._rng)
                if err.retry_after_s is not None:
                    delay = min(policy.max_delay_s, max(delay, err.retry_after_s))
                retries += 1
                logger.warning(
                    "LLM request failed (%s); retry %d/%d in %.2f s",
                    reasons[-1],
                    retries,
                    policy.max_attempts - 1,
                    delay,
                )
                self._sleep(delay)
                continue
            return self._parse(payload, attempt)
