"""``fedmpt conditions``: list, show and derive condition sets.

- ``fedmpt conditions list``: the packaged offline defaults.
- ``fedmpt conditions show NAME|PATH [--dataset NAME | --classes FILE]``: validate a conditions file
  (optionally against a class list) and print its conditions and provenance summary.
- ``fedmpt conditions derive (--dataset NAME | --classes FILE) --n N --endpoint URL --model NAME [--output
  FILE]``: run the two-stage LLM pipeline against an OpenAI-compatible chat-completions endpoint and write the
  conditions file. Rerunning the same command resumes from the response cache.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedmpt.conditions.defaults_build import read_classnames_file
from fedmpt.conditions.file import builtin_condition_names, load_conditions, save_conditions
from fedmpt.conditions.llm_client import ChatClient, ChatClientConfig, LLMError, RetryPolicy
from fedmpt.conditions.pipeline import PipelineConfig, derive_conditions, domain_for_dataset
from fedmpt.conditions.sampling import SamplingConfig, load_cooccurrence
from fedmpt.errors import ConfigError

logger = logging.getLogger(__name__)


def _builtin_classnames(dataset: str) -> tuple[str, ...]:
    from fedmpt.data.classnames import BUILTIN_CLASSNAMES

    if dataset not in BUILTIN_CLASSNAMES:
        raise ConfigError(
            f"--dataset {dataset!r} is not a built-in dataset ({sorted(BUILTIN_CLASSNAMES)}); give --classes FILE"
        )
    return tuple(BUILTIN_CLASSNAMES[dataset])


def _classnames(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.classes is not None:
        return tuple(read_classnames_file(args.classes))
    if args.dataset is not None:
        return _builtin_classnames(args.dataset)
    return None


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from err


def _cmd_list(args: argparse.Namespace) -> int:
    for name in builtin_condition_names():
        cset = load_conditions(name)
        print(f"{name}: {', '.join(cset.conditions)}  [{cset.provenance['source']}]")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    cset = load_conditions(args.conditions, classnames=_classnames(args))
    prov = cset.provenance
    print(f"dataset: {cset.dataset}")
    print(f"classes: {len(cset.classnames)} (sha256 {cset.classnames_sha256})")
    print(f"source: {prov['source']}, created {prov['created']}")
    if "model" in prov:
        print(f"model: {prov['model']}")
    if "note" in prov:
        print(f"note: {prov['note']}")
    print("conditions:")
    for index, condition in enumerate(cset.conditions):
        print(f"  {index}: {condition}")
    return 0


def _cmd_derive(args: argparse.Namespace) -> int:
    classnames = _classnames(args)
    if classnames is None:
        raise ConfigError("conditions derive needs --dataset NAME (built-in) or --classes FILE")
    output: Path
    if args.output is not None:
        output = args.output
    else:
        stem = args.dataset if args.dataset is not None else Path(args.classes).stem
        output = Path(f"{stem}.conditions.json")
    cache_dir: Path = args.cache_dir if args.cache_dir is not None else output.with_name(output.name + ".cache")
    cooccurrence: Any = None
    if args.cooccurrence is not None:
        cooccurrence = load_cooccurrence(args.cooccurrence, classnames)
    client_config = ChatClientConfig(
        endpoint=args.endpoint,
        model=args.model,
        temperature=args.temperature,
        seed=None if args.no_seed else args.seed,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        retry=RetryPolicy(max_attempts=args.max_attempts, base_delay_s=args.backoff, max_delay_s=args.max_backoff),
        api_key_env=args.api_key_env,
        allow_insecure_http=args.allow_insecure_http,
    )
    # Backoff jitter only: not security-relevant, and it should differ between concurrent runs.
    client = ChatClient(client_config, rng=np.random.default_rng())
    config = PipelineConfig(
        n_conditions=args.n,
        sampling=SamplingConfig(budget=args.budget, sizes=args.sizes, smoothing=args.smoothing),
        sentences_per_combination=args.sentences,
        max_stage2_descriptions=args.max_descriptions,
        format_retries=args.format_retries,
        domain=args.domain or domain_for_dataset(args.dataset),
        seed=args.seed,
    )
    logger.info("deriving %d conditions for %d classes with %s; cache %s", args.n, len(classnames), client, cache_dir)
    try:
        cset = derive_conditions(classnames, client, config, cache_dir, dataset=args.dataset, cooccurrence=cooccurrence)
    except LLMError:
        logger.error("answers received so far are cached in %s; rerun the same command to resume", cache_dir)
        raise
    save_conditions(cset, output)
    print(f"{output}: {', '.join(cset.conditions)}")
    return 0


def _add_class_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="built-in dataset name (its class list), or the name to record")
    parser.add_argument("--classes", type=Path, help="class list: JSON list or one name per line")


def register(subparsers: Any) -> None:
    """Add ``fedmpt conditions`` and its sub-commands."""
    parser = subparsers.add_parser(
        "conditions",
        help="list, show and derive FedMPT condition sets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=lambda args: (parser.print_help(file=sys.stderr), 2)[1])
    sub = parser.add_subparsers(dest="conditions_command", metavar="ACTION")

    p_list = sub.add_parser("list", help="list the packaged offline defaults")
    p_list.set_defaults(func=_cmd_list)

    p_show = sub.add_parser("show", help="validate and print a conditions file or built-in default")
    p_show.add_argument("conditions", help="built-in name (e.g. voc2007) or path to a conditions JSON file")
    _add_class_source(p_show)
    p_show.set_defaults(func=_cmd_show)

    p_derive = sub.add_parser(
        "derive",
        help="derive conditions with an LLM (OpenAI-compatible endpoint)",
        description="Run the two-stage LLM pipeline; rerun the same command to resume from the cache.",
    )
    _add_class_source(p_derive)
    p_derive.add_argument("--n", type=int, default=5, help="number of conditions N (default 5)")
    p_derive.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:11434/v1")
    p_derive.add_argument("--model", required=True, help="model name as the server knows it")
    p_derive.add_argument(
        "--output",
        type=Path,
        help="conditions JSON file to write (default: ./<dataset or classes stem>.conditions.json)",
    )
    p_derive.add_argument("--cache-dir", type=Path, help="response cache (default: OUTPUT.cache next to the output)")
    p_derive.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the API key, if any")
    p_derive.add_argument("--budget", type=int, default=200, help="stage-1 requests (class combinations)")
    p_derive.add_argument("--sizes", type=_sizes, default=(2, 3), help="combination sizes (default 2,3)")
    p_derive.add_argument(
        "--cooccurrence",
        type=Path,
        help='aggregate counts {"classnames": [...], "counts": [[...]]} (kept local)',
    )
    p_derive.add_argument("--smoothing", type=float, default=0.0, help="pseudo-count added to combination weights")
    p_derive.add_argument("--sentences", type=int, default=3, help="sentences per combination in stage 1")
    p_derive.add_argument("--max-descriptions", type=int, default=150, help="stage-1 sentences shown in stage 2")
    p_derive.add_argument("--format-retries", type=int, default=2, help="correction turns after a malformed answer")
    p_derive.add_argument("--domain", help="image domain named in the prompts (default from the dataset)")
    p_derive.add_argument("--seed", type=int, default=0, help="sampling seed, also sent to the LLM")
    p_derive.add_argument("--no-seed", action="store_true", help="do not send 'seed' to the LLM")
    p_derive.add_argument("--temperature", type=float, default=0.0)
    p_derive.add_argument("--max-tokens", type=int, default=None)
    p_derive.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p_derive.add_argument("--max-attempts", type=int, default=5, help="attempts per request (429/5xx/timeouts)")
    p_derive.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds")
    p_derive.add_argument("--max-backoff", type=float, default=30.0, help="longest retry delay in seconds")
    p_derive.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow sending the API key over plain http to a non-loopback host (insecure)",
    )
    p_derive.set_defaults(func=_cmd_derive)
