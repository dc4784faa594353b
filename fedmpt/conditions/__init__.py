"""Abstract conditions of FedMPT: the versioned conditions file, offline defaults and LLM-driven discovery.

- :mod:`fedmpt.conditions.file`: :class:`ConditionSet` and its JSON file (``load_conditions``,
  ``save_conditions``).
- :mod:`fedmpt.conditions.defaults_build`: the packaged offline defaults and the script that writes them.
- :mod:`fedmpt.conditions.llm_client`, :mod:`~fedmpt.conditions.sampling`, :mod:`~fedmpt.conditions.pipeline`:
  the paper's two-stage LLM pipeline against any OpenAI-compatible chat-completions endpoint.
"""

from fedmpt.conditions.file import (
    ConditionSet,
    ProvenanceSource,
    builtin_condition_names,
    classnames_sha256,
    load_conditions,
    save_conditions,
    validate_conditions,
)

__all__ = [
    "ConditionSet",
    "ProvenanceSource",
    "builtin_condition_names",
    "classnames_sha256",
    "load_conditions",
    "save_conditions",
    "validate_conditions",
]
