"""On-disk cache of LLM responses that makes the conditions pipeline resumable.

Each response is stored as ``<directory>/<key>.json`` with ``key = sha256(canonical JSON of {"model",
"template", "messages"})``: the endpoint is not part of the key (the same model behind another URL gives a
cache hit), the template name is (a new template version never reuses old answers), and so are the exact
messages (including correction turns, so each retry of a malformed answer is its own entry). A rerun with the
same inputs replays every cached answer and only sends the requests that never completed. Entries are JSON
written atomically; an unreadable or inconsistent entry is logged and treated as missing, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmpt.errors import ConditionsError

__all__ = ["CachedResponse", "ResponseCache", "cache_key"]

logger = logging.getLogger(__name__)


def cache_key(model: str, template: str, messages: Sequence[Mapping[str, str]]) -> str:
    """Hex SHA-256 of ``{"model", "template", "messages"}`` as canonical JSON (sorted keys, no spaces)."""
    material = {
        "model": model,
        "template": template,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
    }
    canonical = json.dumps(material, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    """One stored answer and when it was requested and received (ISO 8601, UTC)."""

    key: str
    response: str
    response_model: str | None
    requested_at: str
    received_at: str

    def to_json_dict(self) -> dict[str, Any]:
        """The fields as a JSON object."""
        return {
            "key": self.key,
            "response": self.response,
            "response_model": self.response_model,
            "requested_at": self.requested_at,
            "received_at": self.received_at,
        }


class ResponseCache:
    """A folder of cached responses (created on first use)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ConditionsError(f"response cache {str(self.directory)!r} exists and is not a folder")

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ConditionsError(f"response cache key {key!r} is not a hex SHA-256")
        return self.directory / f"{key}.json"

    def get(self, key: str) -> CachedResponse | None:
        """The cached response for ``key``, or ``None`` (also for a corrupt entry, which is logged)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entry = CachedResponse(
                key=data["key"],
                response=data["response"],
                response_model=data.get("response_model"),
                requested_at=data["requested_at"],
                received_at=data["received_at"],
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            logger.warning("ignoring unreadable cache entry %s (%s)", path, err)
            return None
        if entry.key != key or not isinstance(entry.response, str):
            logger.warning("ignoring inconsistent cache entry %s", path)
            return None
        return entry

    def put(self, entry: CachedResponse) -> None:
        """Store ``entry`` atomically (temp file in the same folder, then rename)."""
        path = self._path(entry.key)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.key[:16]}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(entry.to_json_dict(), handle, ensure_ascii=False, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        if not self.directory.is_dir():
            return 0
        return sum(1 for p in self.directory.glob("*.json"))
