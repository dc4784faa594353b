"""A loopback OpenAI-compatible chat-completions stub server that answers from the fixtures folder.

The server runs in a thread on 127.0.0.1, port 0 (the OS picks a free port), and is always shut down by the
fixture finalizer. Behaviour per request is scripted: ``stub.script`` is a queue of modes consumed one per
request (``"ok"``, ``"500"``, ``"429"``, ``"404"``, ``"seed400"``, ``"redirect"``, ``"slow"``, ``"badjson"``,
``"noshape"``); an empty queue means ``"ok"``. An ``"ok"`` answer is ``stage1_answer.txt`` for stage-1 prompts
and, for stage-2 prompts, the next name in ``stub.stage2_answers`` (default ``stage2_answer.txt``). Every
request is recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StubLLM:
    url: str = ""
    script: deque[str] = field(default_factory=deque)
    stage2_answers: deque[str] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    slow_s: float = 1.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def stage_of(self, body: dict[str, Any]) -> int:
        return 2 if "Think step by step" in body["messages"][1]["content"] else 1


def _completion(model: str, content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
        }
    ).encode("utf-8")


def _make_handler(stub: StubLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length).decode("utf-8"))
            with stub.lock:
                stub.requests.append(RecordedRequest(self.path, dict(self.headers.items()), body))
                mode = stub.script.popleft() if stub.script else "ok"
                stage = stub.stage_of(body)
                answer = "stage1_answer.txt"
                if stage == 2 and mode == "ok":
                    answer = stub.stage2_answers.popleft() if stub.stage2_answers else "stage2_answer.txt"
            if self.path != "/v1/chat/completions":
                self._send(404, b'{"error": "not found"}')
            elif mode == "500":
                self._send(500, b'{"error": "internal"}')
            elif mode == "429":
                self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0.05"})
            elif mode == "404":
                self._send(404, b'{"error": {"message": "model not found"}}')
            elif mode == "seed400":
                self._send(400, b'{"error": {"message": "Unsupported parameter: seed"}}')
            elif mode == "redirect":
                self._send(307, b"", {"Location": "http://127.0.0.2:1/v1/chat/completions"})
            elif mode == "badjson":
                self._send(200, b"<html>not json</html>")
            elif mode == "noshape":
                self._send(200, b'{"result": "hello"}')
            elif mode == "slow":
                time.sleep(stub.slow_s)
                self._send(200, _completion(body["model"], fixture_text(answer)))
            else:
                self._send(200, _completion(body["model"], fixture_text(answer)))

    return Handler


@contextmanager
def running_stub() -> Iterator[StubLLM]:
    """A running stub server; ``stub.url`` is its base URL without ``/v1``; shut down on exit."""
    stub = StubLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(stub))
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    stub.url = f"http://{host!s}:{port}"
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
