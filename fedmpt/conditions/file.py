"""The versioned conditions file: the N abstract conditions a FedMPT model inserts into its prompts.

FedMPT builds, for every condition n and class c, the prompt ``[V_1..V_bcond] [COND_n] [U_1..U_bcls]
[CLASS_c]``. The condition texts (``COND_n``) are fixed before training, either from a packaged offline
default or from the two-stage LLM pipeline of :mod:`fedmpt.conditions.pipeline`, and stored in a small JSON
file::

    {
      "format": "fedmpt-conditions",
      "version": 1,
      "conditions": ["spatial layout", "object pose", ...],
      "classnames": ["aeroplane", "bicycle", ...],
      "classnames_sha256": "<hex sha256 of the canonical JSON of classnames>",
      "dataset": "voc2007" | null,
      "provenance": {"source": "offline-default" | "llm", "created": "<ISO 8601 timestamp>", ...}
    }

The class list is part of the file because conditions are derived for a given label space; a model that loads
the file for another class list gets a :class:`~fedmpt.errors.ConditionsError` naming the differing class
names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import types
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from fedmpt.errors import ConditionsError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_CONDITION_CHARS",
    "MAX_CONDITION_WORDS",
    "ConditionSet",
    "ProvenanceSource",
    "builtin_condition_names",
    "classnames_sha256",
    "load_conditions",
    "save_conditions",
    "validate_conditions",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "fedmpt-conditions"
FORMAT_VERSION = 1
#: A condition is an abstract factor ("object pose"), not a sentence; it is spliced into a 77-token CLIP
#: prompt next to learned context tokens, so it must stay short.
MAX_CONDITION_WORDS = 5
MAX_CONDITION_CHARS = 40

_DEFAULTS_PACKAGE = "fedmpt.conditions.defaults"


class ProvenanceSource(StrEnum):
    """Where a condition set came from (``provenance["source"]``)."""

    OFFLINE_DEFAULT = "offline-default"
    LLM = "llm"


class _Field(StrEnum):
    """Top-level keys of the JSON file."""

    FORMAT = "format"
    VERSION = "version"
    CONDITIONS = "conditions"
    CLASSNAMES = "classnames"
    CLASSNAMES_SHA256 = "classnames_sha256"
    DATASET = "dataset"
    PROVENANCE = "provenance"


def classnames_sha256(classnames: Sequence[str]) -> str:
    """Hex SHA-256 of a class list in its canonical JSON form.

    Canonical form: ``json.dumps(list(classnames), ensure_ascii=False, separators=(",", ":"))`` encoded as
    UTF-8, so the hash depends on the names *and their order* (the model indexes classes by position) and on
    nothing else.
    """
    canonical = json.dumps(list(classnames), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def validate_conditions(conditions: Iterable[object], *, where: str = "conditions") -> tuple[str, ...]:
    """Check and normalise a list of condition texts; returns them stripped, in their original order.

    Rules: at least one condition; each a string without control characters, non-empty after stripping,
    at most :data:`MAX_CONDITION_WORDS` words and :data:`MAX_CONDITION_CHARS` characters; no two equal
    case-insensitively (``str.casefold``) after collapsing inner whitespace. ``where`` names the source (a
    file, an LLM answer) in the :class:`~fedmpt.errors.ConditionsError` raised on the first violation.
    """
    result: list[str] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(conditions):
        if not isinstance(raw, str):
            raise ConditionsError(f"{where}: condition #{index} is {raw!r} ({type(raw).__name__}), not a string")
        if any(unicodedata.category(ch).startswith("C") for ch in raw):
            raise ConditionsError(f"{where}: condition #{index} {raw!r} contains control characters")
        text = " ".join(raw.split())
        if not text:
            raise ConditionsError(f"{where}: condition #{index} is empty")
        n_words = len(text.split(" "))
        if n_words > MAX_CONDITION_WORDS:
            raise ConditionsError(
                f"{where}: condition #{index} {text!r} has {n_words} words; at most {MAX_CONDITION_WORDS} allowed"
            )
        if len(text) > MAX_CONDITION_CHARS:
            raise ConditionsError(
                f"{where}: condition #{index} {text!r} has {len(text)} characters; "
                f"at most {MAX_CONDITION_CHARS} allowed"
            )
        key = text.casefold()
        if key in seen:
            raise ConditionsError(
                f"{where}: condition #{index} {text!r} duplicates condition #{seen[key]} (case-insensitive)"
            )
        seen[key] = index
        result.append(text)
    if not result:
        raise ConditionsError(f"{where}: the list of conditions is empty")
    return tuple(result)


def _validate_classnames(classnames: Iterable[object], *, where: str) -> tuple[str, ...]:
    names: list[str] = []
    seen: set[str] = set()
    for index, name in enumerate(classnames):
        if not isinstance(name, str) or not name.strip():
            raise ConditionsError(f"{where}: class name #{index} is {name!r}; expected a non-empty string")
        if name in seen:
            raise ConditionsError(f"{where}: class name {name!r} appears more than once")
        seen.add(name)
        names.append(name)
    if not names:
        raise ConditionsError(f"{where}: the class list is empty")
    return tuple(names)


def _validate_provenance(provenance: object, *, where: str) -> Mapping[str, Any]:
    if not isinstance(provenance, Mapping):
        raise ConditionsError(f"{where}: provenance is {type(provenance).__name__}, expected a JSON object")
    source = provenance.get("source")
    if source not in {s.value for s in ProvenanceSource}:
        raise ConditionsError(
            f"{where}: provenance.source is {source!r}; expected one of {[s.value for s in ProvenanceSource]}"
        )
    created = provenance.get("created")
    if not isinstance(created, str):
        raise ConditionsError(f"{where}: provenance.created is {created!r}; expected an ISO 8601 timestamp string")
    try:
        datetime.fromisoformat(created)
    except ValueError as err:
        raise ConditionsError(f"{where}: provenance.created {created!r} is not an ISO 8601 timestamp") from err
    try:
        # Round-trip through JSON: guarantees the mapping is serialisable and yields a private deep copy.
        copied = json.loads(json.dumps(dict(provenance), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ConditionsError(f"{where}: provenance is not JSON-serialisable ({err})") from err
    return types.MappingProxyType(copied)


def _abbreviate(names: Sequence[str], limit: int = 10) -> str:
    shown = repr(list(names[:limit]))
    return shown if len(names) <= limit else f"{shown[:-1]}, ... and {len(names) - limit} more]"


@dataclass(frozen=True)
class ConditionSet:
    """An ordered set of abstract conditions, tied to the class list they were derived for.

    ``conditions[n]`` is the text spliced into the ``[COND_n]`` slot of the prompts; ``classnames`` is the
    label space in model order. ``provenance`` records where the conditions came from (``source`` and
    ``created`` are required; the LLM pipeline adds model, prompts, raw responses and timestamps); it is
    stored read-only. Construction validates everything and raises :class:`~fedmpt.errors.ConditionsError` on
    the first problem.
    """

    conditions: tuple[str, ...]
    classnames: tuple[str, ...]
    dataset: str | None
    provenance: Mapping[str, Any] = field(hash=False)

    def __post_init__(self) -> None:
        where = f"conditions for dataset {self.dataset!r}" if self.dataset is not None else "conditions"
        if self.dataset is not None and (not isinstance(self.dataset, str) or not self.dataset.strip()):
            raise ConditionsError(f"{where}: dataset must be a non-empty string or None, got {self.dataset!r}")
        if isinstance(self.conditions, str):
            raise ConditionsError(
                f"{where}: conditions must be a sequence of strings, got the string {self.conditions!r}"
            )
        if isinstance(self.classnames, str):
            raise ConditionsError(
                f"{where}: classnames must be a sequence of strings, got the string {self.classnames!r}"
            )
        object.__setattr__(self, "conditions", validate_conditions(self.conditions, where=where))
        object.__setattr__(self, "classnames", _validate_classnames(self.classnames, where=where))
        object.__setattr__(self, "provenance", _validate_provenance(self.provenance, where=where))

    def __reduce__(self) -> tuple[type[ConditionSet], tuple[Any, ...]]:
        # The read-only provenance view cannot be pickled; rebuild from a plain dict (and re-validate), so a
        # ConditionSet can travel inside configs to local worker processes (e.g. simulation actors).
        return (type(self), (self.conditions, self.classnames, self.dataset, dict(self.provenance)))

    @property
    def n_conditions(self) -> int:
        """N, the number of conditions."""
        return len(self.conditions)

    @property
    def classnames_sha256(self) -> str:
        """SHA-256 of the class list (see :func:`classnames_sha256`)."""
        return classnames_sha256(self.classnames)

    @property
    def source(self) -> ProvenanceSource:
        """``provenance["source"]`` as an enum."""
        return ProvenanceSource(self.provenance["source"])

    def check_classnames(self, classnames: Sequence[str], *, where: str = "conditions") -> None:
        """Raise :class:`~fedmpt.errors.ConditionsError` unless ``classnames`` equals this set's class list.

        The message says which names are missing, which are extra and, for the same names in another order,
        the first position where the orders differ.
        """
        expected = tuple(classnames)
        if expected == self.classnames:
            return
        file_names, wanted = set(self.classnames), set(expected)
        missing = [n for n in expected if n not in file_names]
        extra = [n for n in self.classnames if n not in wanted]
        parts: list[str] = []
        if missing:
            parts.append(f"{len(missing)} classes missing from the file: {_abbreviate(missing)}")
        if extra:
            parts.append(f"{len(extra)} classes in the file but not expected: {_abbreviate(extra)}")
        if not parts:
            if len(expected) != len(self.classnames):
                parts.append(f"{len(self.classnames)} names in the file vs {len(expected)} expected")
            else:
                pos = next(i for i, (a, b) in enumerate(zip(self.classnames, expected, strict=True)) if a != b)
                parts.append(
                    f"same names in another order: position {pos} is {self.classnames[pos]!r} in the file "
                    f"but {expected[pos]!r} expected"
                )
        raise ConditionsError(f"{where}: made for another class list; " + "; ".join(parts))

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object written by :func:`save_conditions` (keys in the documented order)."""
        return {
            _Field.FORMAT.value: FORMAT_NAME,
            _Field.VERSION.value: FORMAT_VERSION,
            _Field.CONDITIONS.value: list(self.conditions),
            _Field.CLASSNAMES.value: list(self.classnames),
            _Field.CLASSNAMES_SHA256.value: self.classnames_sha256,
            _Field.DATASET.value: self.dataset,
            _Field.PROVENANCE.value: json.loads(json.dumps(dict(self.provenance))),
        }

    @classmethod
    def from_json_dict(cls, data: object, *, where: str = "conditions") -> ConditionSet:
        """Parse and validate the JSON object of a conditions file; ``where`` names the file in errors."""
        if not isinstance(data, Mapping):
            raise ConditionsError(f"{where}: top level is {type(data).__name__}, expected a JSON object")
        fmt = data.get(_Field.FORMAT.value)
        if fmt != FORMAT_NAME:
            raise ConditionsError(f"{where}: format is {fmt!r}, expected {FORMAT_NAME!r}")
        version = data.get(_Field.VERSION.value)
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ConditionsError(f"{where}: version is {version!r}; this fedmpt reads version {FORMAT_VERSION}")
        known = {f.value for f in _Field}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConditionsError(f"{where}: unknown top-level keys {unknown}")
        missing = sorted(known - set(data))
        if missing:
            raise ConditionsError(f"{where}: missing keys {missing}")
        conditions = data[_Field.CONDITIONS.value]
        classnames = data[_Field.CLASSNAMES.value]
        for key, value in ((_Field.CONDITIONS, conditions), (_Field.CLASSNAMES, classnames)):
            if not isinstance(value, list):
                raise ConditionsError(f"{where}: {key.value} is {type(value).__name__}, expected a JSON list")
        dataset = data[_Field.DATASET.value]
        if dataset is not None and not isinstance(dataset, str):
            raise ConditionsError(f"{where}: dataset is {dataset!r}, expected a string or null")
        try:
            cset = cls(
                conditions=tuple(conditions),
                classnames=tuple(classnames),
                dataset=dataset,
                provenance=data[_Field.PROVENANCE.value],
            )
        except ConditionsError as err:
            raise ConditionsError(f"{where}: {err}") from err
        stored_hash = data[_Field.CLASSNAMES_SHA256.value]
        if stored_hash != cset.classnames_sha256:
            raise ConditionsError(
                f"{where}: classnames_sha256 is {stored_hash!r} but the class list hashes to "
                f"{cset.classnames_sha256!r} (the class list was edited or the file is corrupt)"
            )
        return cset


def builtin_condition_names() -> tuple[str, ...]:
    """Names of the packaged offline defaults (``fedmpt/conditions/defaults/<name>.json``), sorted."""
    root = resources.files(_DEFAULTS_PACKAGE)
    return tuple(sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json")))


def _read_json(text: str, *, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConditionsError(f"{where}: not valid JSON ({err})") from err


def load_conditions(path_or_name: str | os.PathLike[str], classnames: Sequence[str] | None = None) -> ConditionSet:
    """Load and validate a conditions file, or a packaged default by its dataset name.

    A ``str`` equal to a name of :func:`builtin_condition_names` (e.g. ``"voc2007"``) loads the packaged
    offline default; anything else is a filesystem path (pass a :class:`~pathlib.Path` to force a path). With
    ``classnames``, the file must have been made for exactly that class list, in that order.
    """
    if isinstance(path_or_name, str) and path_or_name in builtin_condition_names():
        where = f"built-in conditions {path_or_name!r}"
        text = resources.files(_DEFAULTS_PACKAGE).joinpath(f"{path_or_name}.json").read_text(encoding="utf-8")
    else:
        path = Path(path_or_name)
        where = f"conditions file {str(path)!r}"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            hint = ""
            if isinstance(path_or_name, str) and os.sep not in path_or_name and not path_or_name.endswith(".json"):
                hint = f" (and not a built-in name: {list(builtin_condition_names())})"
            raise ConditionsError(f"{where}: no such file{hint}") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConditionsError(f"{where}: cannot read ({err})") from err
    cset = ConditionSet.from_json_dict(_read_json(text, where=where), where=where)
    if classnames is not None:
        cset.check_classnames(classnames, where=where)
    logger.debug("loaded %d conditions from %s", cset.n_conditions, where)
    return cset


def save_conditions(cset: ConditionSet, path: str | os.PathLike[str]) -> Path:
    """Write ``cset`` as JSON to ``path`` atomically (temp file in the same folder, fsync, rename); returns
    the path.

    A reader never sees a half-written file: either the old content or the new one.
    """
    target = Path(path)
    text = json.dumps(cset.to_json_dict(), ensure_ascii=False, indent=2) + "\n"
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise ConditionsError(f"conditions file {str(target)!r}: folder {str(directory)!r} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp creates 0600; a conditions file holds nothing secret
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote %d conditions to %s", cset.n_conditions, target)
    return target
