"""The paper's two-stage LLM pipeline that derives N abstract conditions for a class list.

Stage 1 (scene descriptions): for each sampled class combination (:mod:`fedmpt.conditions.sampling`), ask the
LLM for a few sentences describing realistic images where those classes co-occur (template ``stage1_v1``).
Stage 2 (abstraction): give the LLM the stage-1 sentences and ask it to reason step by step and end with a
JSON list of exactly N non-overlapping abstract conditions (template ``stage2_v1``). The final list is
extracted robustly (the last JSON list in the answer, after any ``<think>`` block) and validated: exactly N,
distinct case-insensitively, each at most :data:`~fedmpt.conditions.file.MAX_CONDITION_WORDS` words, no class
name, no copied placeholder. A malformed answer is answered with a correction turn that names the problem, up
to ``format_retries`` times; then :class:`MalformedAnswerError` is raised with the raw text.

What leaves the site: the class names (in the prompts) and nothing else. Optional aggregate co-occurrence
counts only steer which combinations are sampled, locally; they are never sent, although the set of
combinations asked about reveals which classes tend to co-occur. Every request and answer is cached on disk
(:mod:`fedmpt.conditions.response_cache`), so an interrupted run resumes without repeating requests, and
recorded in the provenance of the conditions file (model, template versions and hashes, every prompt and raw
answer, timestamps, the class-list hash).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from fedmpt import __version__
from fedmpt.conditions.file import (
    ConditionSet,
    ProvenanceSource,
    classnames_sha256,
    validate_conditions,
)
from fedmpt.conditions.llm_client import ChatClientConfig, ChatCompletion, Role
from fedmpt.conditions.prompt_template import PromptTemplate, load_template
from fedmpt.conditions.response_cache import CachedResponse, ResponseCache, cache_key
from fedmpt.conditions.sampling import SamplingConfig, sample_class_combinations
from fedmpt.errors import ConditionsError, ConfigError

__all__ = [
    "CallRecord",
    "ChatBackend",
    "ConditionsPipeline",
    "MalformedAnswerError",
    "PipelineConfig",
    "derive_conditions",
    "domain_for_dataset",
    "parse_condition_list",
    "parse_stage1_sentences",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Words asked for in the stage-2 prompt; validation accepts up to MAX_CONDITION_WORDS.
PROMPT_MAX_WORDS = 3
_MIN_SENTENCE_WORDS = 4
_MAX_SENTENCE_WORDS = 80
_THINK_RE = re.compile(r"<think>.*?</think>", flags=re.DOTALL | re.IGNORECASE)
_BULLET_RE = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")

_DOMAINS: Mapping[str, str] = {
    "chestxray14": "chest X-ray radiographs",
    "bigearthnet": "satellite images of the land surface",
    "mlrsnet": "aerial and satellite images",
}
_DEFAULT_DOMAIN = "natural photographs"


class MalformedAnswerError(ConditionsError):
    """An LLM answer could not be parsed into what the stage needs; ``raw`` holds the answer text."""

    def __init__(self, problem: str, raw: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.raw = raw


class ChatBackend(Protocol):
    """What the pipeline needs from a client (:class:`~fedmpt.conditions.llm_client.ChatClient` fits)."""

    @property
    def model(self) -> str: ...

    def complete(self, messages: Sequence[Mapping[str, str]]) -> ChatCompletion: ...


def domain_for_dataset(dataset: str | None) -> str:
    """The image domain named in the prompts: per built-in dataset, else ``"natural photographs"``."""
    return _DOMAINS.get(dataset or "", _DEFAULT_DOMAIN)


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the two stages (the LLM endpoint itself is configured in the client).

    ``format_retries`` (K): correction turns after a malformed answer before giving up; ``seed``: seeds the
    combination sampling and the choice of stage-1 sentences shown in stage 2 (when there are more than
    ``max_stage2_descriptions``).
    """

    n_conditions: int = 5
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sentences_per_combination: int = 3
    max_stage2_descriptions: int = 150
    format_retries: int = 2
    domain: str = _DEFAULT_DOMAIN
    stage1_template: str = "stage1_v1"
    stage2_template: str = "stage2_v1"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n_conditions, int) or not 1 <= self.n_conditions <= 32:
            raise ConfigError(f"n_conditions must be an int in [1, 32], got {self.n_conditions!r}")
        if not isinstance(self.sentences_per_combination, int) or not 1 <= self.sentences_per_combination <= 20:
            raise ConfigError(f"sentences_per_combination must be in [1, 20], got {self.sentences_per_combination!r}")
        if not isinstance(self.max_stage2_descriptions, int) or self.max_stage2_descriptions < 1:
            raise ConfigError(f"max_stage2_descriptions must be >= 1, got {self.max_stage2_descriptions!r}")
        if not isinstance(self.format_retries, int) or self.format_retries < 0:
            raise ConfigError(f"format_retries must be an int >= 0, got {self.format_retries!r}")
        if not self.domain.strip():
            raise ConfigError("domain must be a non-empty description of the images, e.g. 'natural photographs'")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class CallRecord:
    """One request and its answer, as written to the provenance."""

    stage: str
    classes: tuple[str, ...] | None
    attempt: int
    cache_key: str
    messages: tuple[Mapping[str, str], ...]
    response: str
    response_model: str | None
    requested_at: str
    received_at: str
    from_cache: bool
    accepted: bool = False
    problem: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The record as a JSON object."""
        return {
            "stage": self.stage,
            "classes": None if self.classes is None else list(self.classes),
            "attempt": self.attempt,
            "cache_key": self.cache_key,
            "messages": [dict(m) for m in self.messages],
            "response": self.response,
            "response_model": self.response_model,
            "requested_at": self.requested_at,
            "received_at": self.received_at,
            "from_cache": self.from_cache,
            "accepted": self.accepted,
            "problem": self.problem,
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _strip_think(text: str) -> str:
    """Drop ``<think>...</think>`` blocks that reasoning models put before the answer."""
    return _THINK_RE.sub("", text)


def parse_stage1_sentences(text: str, n_sentences: int) -> tuple[str, ...]:
    """The descriptive sentences of a stage-1 answer: the last ``n_sentences`` lines of 4 to 80 words.

    Bullets and numbering are removed; shorter lines (headings, "Here are...:") and reasoning before the
    sentences are skipped. Raises :class:`MalformedAnswerError` when no line qualifies.
    """
    sentences = []
    for line in _strip_think(text).splitlines():
        candidate = _BULLET_RE.sub("", line.strip()).strip().strip('"').strip()
        n_words = len(candidate.split())
        if _MIN_SENTENCE_WORDS <= n_words <= _MAX_SENTENCE_WORDS and not candidate.endswith(":"):
            sentences.append(candidate)
    if not sentences:
        raise MalformedAnswerError(
            f"the answer holds no descriptive sentence (a line of {_MIN_SENTENCE_WORDS} to "
            f"{_MAX_SENTENCE_WORDS} words)",
            text,
        )
    return tuple(sentences[-n_sentences:])


def _json_lists(text: str) -> list[object]:
    """Every top-level JSON array embedded in ``text``, left to right."""
    decoder = json.JSONDecoder()
    found: list[object] = []
    pos = 0
    while True:
        start = text.find("[", pos)
        if start < 0:
            return found
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        found.append(value)
        pos = end


def parse_condition_list(text: str, n_conditions: int, classnames: Sequence[str] = ()) -> tuple[str, ...]:
    """Extract and validate the final JSON list of conditions from a stage-2 answer.

    The final list is the last top-level JSON array in the answer (after removing ``<think>`` blocks; code
    fences are fine). It must hold exactly ``n_conditions`` strings passing
    :func:`~fedmpt.conditions.file.validate_conditions`, none equal to a class name or a ``<placeholder>``.
    Raises :class:`MalformedAnswerError` naming the problem.
    """
    lists = _json_lists(_strip_think(text))
    if not lists:
        raise MalformedAnswerError("the answer does not end with a JSON list of strings", text)
    final = lists[-1]
    if not isinstance(final, list) or not all(isinstance(x, str) for x in final):
        raise MalformedAnswerError(f"the final JSON list {json.dumps(final)[:200]} is not a list of strings", text)
    if len(final) != n_conditions:
        raise MalformedAnswerError(f"the final JSON list has {len(final)} items, expected exactly {n_conditions}", text)
    try:
        conditions = validate_conditions(final, where="the final JSON list")
    except ConditionsError as err:
        raise MalformedAnswerError(str(err), text) from err
    labels = {c.replace("_", " ").casefold() for c in classnames}
    for cond in conditions:
        if cond.startswith("<") or cond.endswith(">"):
            raise MalformedAnswerError(f"the condition {cond!r} is a copied placeholder, not a condition", text)
        if cond.casefold() in labels:
            raise MalformedAnswerError(f"the condition {cond!r} is a class name, not an abstract condition", text)
    return conditions


def _display(name: str) -> str:
    return name.replace("_", " ")


class ConditionsPipeline:
    """Runs stage 1 and stage 2 against ``client``, caching every answer in ``cache``."""

    def __init__(self, client: ChatBackend, config: PipelineConfig, cache: ResponseCache) -> None:
        self.client = client
        self.config = config
        self.cache = cache
        self.stage1_template: PromptTemplate = load_template(config.stage1_template)
        self.stage2_template: PromptTemplate = load_template(config.stage2_template)
        self.n_requests = 0
        self.n_cache_hits = 0

    def _ask(
        self,
        stage: str,
        template: PromptTemplate,
        messages: Sequence[Mapping[str, str]],
        classes: tuple[str, ...] | None,
    ) -> CallRecord:
        key = cache_key(self.client.model, template.name, messages)
        cached = self.cache.get(key)
        if cached is not None:
            self.n_cache_hits += 1
            entry, from_cache = cached, True
        else:
            requested_at = _now()
            completion = self.client.complete(messages)
            self.n_requests += 1
            entry = CachedResponse(
                key=key,
                response=completion.content,
                response_model=completion.model,
                requested_at=requested_at,
                received_at=_now(),
            )
            self.cache.put(entry)
            from_cache = False
        return CallRecord(
            stage=stage,
            classes=classes,
            attempt=0,
            cache_key=key,
            messages=tuple(dict(m) for m in messages),
            response=entry.response,
            response_model=entry.response_model,
            requested_at=entry.requested_at,
            received_at=entry.received_at,
            from_cache=from_cache,
        )

    def _ask_until_valid(
        self,
        stage: str,
        template: PromptTemplate,
        messages: list[dict[str, str]],
        parse: Callable[[str], T],
        correction_values: Mapping[str, object],
        classes: tuple[str, ...] | None = None,
    ) -> tuple[T | None, list[CallRecord], MalformedAnswerError | None]:
        """Ask, parse; on a malformed answer append it and a correction turn and ask again (K times)."""
        records: list[CallRecord] = []
        last_error: MalformedAnswerError | None = None
        for attempt in range(1 + self.config.format_retries):
            record = replace(self._ask(stage, template, messages, classes), attempt=attempt)
            try:
                parsed = parse(record.response)
            except MalformedAnswerError as err:
                records.append(replace(record, problem=err.problem))
                last_error = err
                logger.warning("%s answer malformed (attempt %d): %s", stage, attempt + 1, err.problem)
                correction = template.render("correction", problem=err.problem, **correction_values)
                messages = [
                    *messages,
                    {"role": Role.ASSISTANT.value, "content": record.response},
                    {"role": Role.USER.value, "content": correction},
                ]
                continue
            records.append(replace(record, accepted=True))
            return parsed, records, None
        return None, records, last_error

    def run_stage1(
        self, combinations: Sequence[tuple[str, ...]]
    ) -> tuple[list[tuple[tuple[str, ...], tuple[str, ...]]], list[CallRecord], list[tuple[str, ...]]]:
        """Describe every combination; returns (combination, sentences) pairs, the call records and skipped
        ones.

        A combination whose answers stay malformed after K corrections is skipped with a warning.
        """
        template = self.stage1_template
        n_sentences = self.config.sentences_per_combination
        results: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        records: list[CallRecord] = []
        skipped: list[tuple[str, ...]] = []
        for index, combo in enumerate(combinations):
            classes_text = ", ".join(json.dumps(_display(c), ensure_ascii=False) for c in combo)
            values = {"domain": self.config.domain, "classes": classes_text, "n_sentences": n_sentences}
            messages = [
                {"role": Role.SYSTEM.value, "content": template.render("system", **values)},
                {"role": Role.USER.value, "content": template.render("user", **values)},
            ]
            sentences, calls, error = self._ask_until_valid(
                "stage1",
                template,
                messages,
                lambda text: parse_stage1_sentences(text, n_sentences),
                {"n_sentences": n_sentences},
                classes=tuple(combo),
            )
            records.extend(calls)
            if sentences is None:
                logger.warning("stage 1: skipping %s after %d malformed answers: %s", combo, len(calls), error)
                skipped.append(tuple(combo))
            else:
                results.append((tuple(combo), sentences))
            if (index + 1) % 10 == 0 or index + 1 == len(combinations):
                logger.info(
                    "stage 1: %d/%d combinations (%d requests sent, %d answers from cache)",
                    index + 1,
                    len(combinations),
                    self.n_requests,
                    self.n_cache_hits,
                )
        if not results:
            raise ConditionsError(f"stage 1: no usable description for any of the {len(combinations)} combinations")
        return results, records, skipped

    def run_stage2(
        self, sentences: Sequence[str], classnames: Sequence[str], rng: np.random.Generator
    ) -> tuple[tuple[str, ...], list[CallRecord]]:
        """Summarise ``sentences`` into exactly N conditions; raises :class:`MalformedAnswerError` after K
        retries."""
        cfg = self.config
        shown = list(sentences)
        if len(shown) > cfg.max_stage2_descriptions:
            picks = np.sort(rng.choice(len(shown), size=cfg.max_stage2_descriptions, replace=False))
            shown = [shown[int(i)] for i in picks]
        example = json.dumps([f"<condition {i + 1}>" for i in range(cfg.n_conditions)])
        values = {
            "domain": cfg.domain,
            "descriptions": "\n".join(f"- {s}" for s in shown),
            "n": cfg.n_conditions,
            "max_words": PROMPT_MAX_WORDS,
            "example": example,
        }
        template = self.stage2_template
        messages = [
            {"role": Role.SYSTEM.value, "content": template.render("system", **values)},
            {"role": Role.USER.value, "content": template.render("user", **values)},
        ]
        conditions, records, error = self._ask_until_valid(
            "stage2",
            template,
            messages,
            lambda text: parse_condition_list(text, cfg.n_conditions, classnames),
            {"n": cfg.n_conditions, "max_words": PROMPT_MAX_WORDS, "example": example},
        )
        if conditions is None:
            problem = error.problem if error is not None else "no answer"
            raw = error.raw if error is not None else ""
            raise MalformedAnswerError(
                f"stage 2: no valid list of {cfg.n_conditions} conditions after {len(records)} answers; "
                f"last problem: {problem}; last raw answer:\n{raw}",
                raw,
            )
        return conditions, records

    def derive(
        self,
        classnames: Sequence[str],
        *,
        dataset: str | None = None,
        cooccurrence: NDArray[np.generic] | None = None,
    ) -> ConditionSet:
        """Run both stages for ``classnames`` and return the conditions with their full provenance."""
        names = tuple(classnames)
        sample_seed, subset_seed = np.random.SeedSequence(self.config.seed).spawn(2)
        combos = sample_class_combinations(
            names, self.config.sampling, np.random.default_rng(sample_seed), cooccurrence
        )
        logger.info("stage 1: %d class combinations sampled (budget %d)", len(combos), self.config.sampling.budget)
        described, stage1_records, skipped = self.run_stage1(combos)
        sentences = [s for _, group in described for s in group]
        conditions, stage2_records = self.run_stage2(sentences, names, np.random.default_rng(subset_seed))
        logger.info(
            "derived conditions %s (%d requests sent, %d answers from cache)",
            list(conditions),
            self.n_requests,
            self.n_cache_hits,
        )
        return ConditionSet(
            conditions=conditions,
            classnames=names,
            dataset=dataset,
            provenance=self._provenance(names, combos, skipped, stage1_records, stage2_records, cooccurrence),
        )

    def _provenance(
        self,
        classnames: tuple[str, ...],
        combos: Sequence[tuple[str, ...]],
        skipped: Sequence[tuple[str, ...]],
        stage1_records: Sequence[CallRecord],
        stage2_records: Sequence[CallRecord],
        cooccurrence: NDArray[np.generic] | None,
    ) -> dict[str, Any]:
        cfg = self.config
        generation: dict[str, Any] = {}
        client_config = getattr(self.client, "config", None)
        if isinstance(client_config, ChatClientConfig):
            generation = {
                "temperature": client_config.temperature,
                "seed": client_config.seed,
                "max_tokens": client_config.max_tokens,
            }
        all_records = [*stage1_records, *stage2_records]
        return {
            "source": ProvenanceSource.LLM.value,
            "created": _now(),
            "fedmpt_version": __version__,
            "model": self.client.model,
            "response_models": sorted({r.response_model for r in all_records if r.response_model}),
            "generation": generation,
            "templates": {
                "stage1": self.stage1_template.provenance(),
                "stage2": self.stage2_template.provenance(),
            },
            "pipeline": {
                "n_conditions": cfg.n_conditions,
                "sentences_per_combination": cfg.sentences_per_combination,
                "max_stage2_descriptions": cfg.max_stage2_descriptions,
                "format_retries": cfg.format_retries,
                "domain": cfg.domain,
                "seed": cfg.seed,
            },
            "sampling": {
                "budget": cfg.sampling.budget,
                "sizes": list(cfg.sampling.sizes),
                "smoothing": cfg.sampling.smoothing,
                "weighting": "uniform" if cooccurrence is None else "cooccurrence-counts",
                "n_combinations": len(combos),
                "skipped_combinations": [list(c) for c in skipped],
            },
            "shared_with_llm": "class names only",
            "classnames_sha256": classnames_sha256(classnames),
            "requests_sent": self.n_requests,
            "answers_from_cache": self.n_cache_hits,
            "stage1": [r.to_json_dict() for r in stage1_records],
            "stage2": [r.to_json_dict() for r in stage2_records],
        }


def derive_conditions(
    classnames: Sequence[str],
    client: ChatBackend,
    config: PipelineConfig,
    cache_dir: str | Path,
    *,
    dataset: str | None = None,
    cooccurrence: NDArray[np.generic] | None = None,
) -> ConditionSet:
    """Derive N conditions for ``classnames`` with both stages; answers are cached in ``cache_dir``
    (resumable)."""
    pipeline = ConditionsPipeline(client, config, ResponseCache(cache_dir))
    return pipeline.derive(classnames, dataset=dataset, cooccurrence=cooccurrence)
