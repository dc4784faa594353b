"""Versioned prompt templates of the conditions pipeline, packaged as
``fedmpt/conditions/templates/<name>.txt``.

A template file is plain text: comment lines, then sections opened by ``### <section>`` header lines
(``system``, ``user``, ``correction``). Section bodies use :class:`string.Template` placeholders
(``$classes``); rendering with a missing placeholder is an error. The template name ends in its version
(``stage1_v1``); name and SHA-256 of the file go into the provenance of every derived conditions file, so a
result can be traced to the exact prompt text.
"""

from __future__ import annotations

import hashlib
import re
import string
import types
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from fedmpt.errors import ConfigError

__all__ = ["PromptTemplate", "load_template"]

_TEMPLATES_PACKAGE = "fedmpt.conditions.templates"
_NAME_RE = re.compile(r"^(?P<stage>[a-z0-9]+)_v(?P<version>[0-9]+)$")
_HEADER_RE = re.compile(r"^### (?P<section>[a-z_]+)\s*$")


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: its ``name`` (``stage1_v1``), ``version`` (1), ``sha256`` of the file, sections."""

    name: str
    version: int
    sha256: str
    sections: Mapping[str, str]

    def render(self, section: str, **values: object) -> str:
        """Fill ``section`` with ``values``; every placeholder must be given
        (``string.Template.substitute``)."""
        if section not in self.sections:
            raise ConfigError(f"prompt template {self.name!r} has no section {section!r}; has {sorted(self.sections)}")
        try:
            return string.Template(self.sections[section]).substitute({k: str(v) for k, v in values.items()})
        except (KeyError, ValueError) as err:
            raise ConfigError(f"prompt template {self.name!r}, section {section!r}: bad placeholder ({err})") from err

    def provenance(self) -> dict[str, object]:
        """``{"name", "version", "sha256"}`` for the provenance record."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def parse_template(name: str, text: str) -> PromptTemplate:
    """Parse template ``text`` (see the module docstring); ``name`` must look like ``<stage>_v<version>``."""
    match = _NAME_RE.match(name)
    if match is None:
        raise ConfigError(f"prompt template name {name!r} must look like '<stage>_v<version>', e.g. 'stage1_v1'")
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        header = _HEADER_RE.match(line)
        if header is not None:
            section = header.group("section")
            if section in sections:
                raise ConfigError(f"prompt template {name!r}: section {section!r} appears twice")
            current = sections.setdefault(section, [])
        elif current is not None:
            current.append(line)
    if not sections:
        raise ConfigError(f"prompt template {name!r} has no '### <section>' headers")
    return PromptTemplate(
        name=name,
        version=int(match.group("version")),
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        sections=types.MappingProxyType({k: "\n".join(v).strip("\n") for k, v in sections.items()}),
    )


def load_template(name: str) -> PromptTemplate:
    """Load the packaged template ``templates/<name>.txt``."""
    if _NAME_RE.match(name) is None:
        raise ConfigError(f"prompt template name {name!r} must look like '<stage>_v<version>', e.g. 'stage1_v1'")
    resource = resources.files(_TEMPLATES_PACKAGE).joinpath(f"{name}.txt")
    if not resource.is_file():
        available = sorted(
            p.name.removesuffix(".txt")
            for p in resources.files(_TEMPLATES_PACKAGE).iterdir()
            if p.name.endswith(".txt")
        )
        raise ConfigError(f"no prompt template {name!r}; packaged templates: {available}")
    return parse_template(name, resource.read_text(encoding="utf-8"))
