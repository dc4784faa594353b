"""Write the packaged offline condition defaults: ``python -m fedmpt.conditions.defaults_build``.

The defaults are hand-chosen, not LLM output, and say so in their provenance (``"source": "offline-default"``
and a ``note``). They exist so that every built-in dataset trains without network access or an LLM:

- natural images (VOC2007, COCO2014, NUS-WIDE): the five abstract conditions named in the FedMPT paper
  ("spatial layout", "object pose", "background", "lighting", "object scale");
- chest X-rays (ChestX-ray14): factors that drive co-occurrence of radiographic findings: where in the thorax
  a finding lies, its size, the texture of the opacity, patient position (supine AP portable films go with
  effusion and oedema) and exposure/contrast;
- remote sensing (BigEarthNet, MLRSNet): the layout of land parcels, surface texture, season (snow, bare
  fields, leaf-off forest), sun illumination and object scale relative to the ground sampling distance.

Class lists come from :data:`fedmpt.data.classnames.BUILTIN_CLASSNAMES`. Other datasets (e.g. the synthetic
world) call :func:`write_default` with their own name, class list and conditions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from fedmpt.conditions.file import ConditionSet, ProvenanceSource, load_conditions, save_conditions
from fedmpt.errors import ConditionsError

__all__ = [
    "CHEST_XRAY_CONDITIONS",
    "DEFAULTS_DIR",
    "DEFAULT_CONDITIONS",
    "DEFAULT_NOTES",
    "NATURAL_IMAGE_CONDITIONS",
    "REMOTE_SENSING_CONDITIONS",
    "build_default",
    "main",
    "write_all_defaults",
    "write_default",
]

logger = logging.getLogger(__name__)

#: Folder of the packaged defaults (inside the source tree; the builder writes there).
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"

NATURAL_IMAGE_CONDITIONS: tuple[str, ...] = (
    "spatial layout",
    "object pose",
    "background",
    "lighting",
    "object scale",
)
CHEST_XRAY_CONDITIONS: tuple[str, ...] = (
    "anatomical location",
    "lesion size",
    "opacity texture",
    "patient position",
    "image contrast",
)
REMOTE_SENSING_CONDITIONS: tuple[str, ...] = (
    "spatial arrangement",
    "land texture",
    "season",
    "illumination",
    "object scale",
)

_NATURAL_NOTE = (
    "Offline default, chosen by hand, not produced by an LLM: the five abstract conditions named in the "
    "FedMPT paper (CVPR 2026) for natural-image datasets. Run 'fedmpt conditions derive' to derive "
    "dataset-specific ones."
)
_CHEST_NOTE = (
    "Offline default, chosen by hand, not produced by an LLM: radiographic factors behind co-occurring "
    "findings (location in the thorax, lesion size, opacity texture, patient position AP/PA/supine, exposure "
    "and contrast)."
)
_REMOTE_NOTE = (
    "Offline default, chosen by hand, not produced by an LLM: remote-sensing factors behind co-occurring "
    "land covers (parcel arrangement, surface texture, season, sun illumination, object scale at the "
    "sensor's ground sampling distance)."
)

#: Conditions of each built-in dataset.
DEFAULT_CONDITIONS: Mapping[str, tuple[str, ...]] = {
    "voc2007": NATURAL_IMAGE_CONDITIONS,
    "coco2014": NATURAL_IMAGE_CONDITIONS,
    "nuswide": NATURAL_IMAGE_CONDITIONS,
    "chestxray14": CHEST_XRAY_CONDITIONS,
    "bigearthnet": REMOTE_SENSING_CONDITIONS,
    "mlrsnet": REMOTE_SENSING_CONDITIONS,
}
#: Provenance note of each built-in dataset's default.
DEFAULT_NOTES: Mapping[str, str] = {
    "voc2007": _NATURAL_NOTE,
    "coco2014": _NATURAL_NOTE,
    "nuswide": _NATURAL_NOTE,
    "chestxray14": _CHEST_NOTE,
    "bigearthnet": _REMOTE_NOTE,
    "mlrsnet": _REMOTE_NOTE,
}


def build_default(
    dataset: str,
    classnames: Sequence[str],
    conditions: Sequence[str],
    *,
    note: str,
    created: str | None = None,
) -> ConditionSet:
    """An offline-default :class:`ConditionSet` (``provenance = {"source": "offline-default", "created",
    "note"}``).

    ``created`` defaults to the current UTC time in ISO 8601.
    """
    if not note.strip():
        raise ConditionsError(f"offline default for {dataset!r}: note must say where the conditions come from")
    return ConditionSet(
        conditions=tuple(conditions),
        classnames=tuple(classnames),
        dataset=dataset,
        provenance={
            "source": ProvenanceSource.OFFLINE_DEFAULT.value,
            "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
            "note": note,
        },
    )


def write_default(
    dataset: str,
    classnames: Sequence[str],
    conditions: Sequence[str],
    *,
    note: str,
    directory: str | Path = DEFAULTS_DIR,
) -> Path:
    """Write ``<directory>/<dataset>.json``; returns its path.

    If the file already holds the same conditions, class list and note, its ``created`` timestamp is kept, so
    a rerun leaves the file byte-identical (no spurious diffs in version control).
    """
    if not dataset or any(ch in dataset for ch in "/\\.") or dataset != dataset.strip():
        raise ConditionsError(f"dataset name {dataset!r} cannot name a defaults file (no '/', '\\\\', '.')")
    target = Path(directory) / f"{dataset}.json"
    created: str | None = None
    if target.exists():
        try:
            old = load_conditions(target)
        except ConditionsError as err:
            logger.warning("replacing unreadable default %s: %s", target, err)
        else:
            if (
                old.conditions == tuple(conditions)
                and old.classnames == tuple(classnames)
                and old.provenance.get("note") == note
            ):
                created = str(old.provenance["created"])
    cset = build_default(dataset, classnames, conditions, note=note, created=created)
    return save_conditions(cset, target)


def write_all_defaults(directory: str | Path = DEFAULTS_DIR, datasets: Sequence[str] | None = None) -> list[Path]:
    """(Re)write the default of every built-in dataset (or of ``datasets``) from ``BUILTIN_CLASSNAMES``."""
    from fedmpt.data.classnames import BUILTIN_CLASSNAMES

    names = list(DEFAULT_CONDITIONS) if datasets is None else list(datasets)
    paths = []
    for name in names:
        if name not in DEFAULT_CONDITIONS:
            raise ConditionsError(f"no default conditions for dataset {name!r}; known: {sorted(DEFAULT_CONDITIONS)}")
        if name not in BUILTIN_CLASSNAMES:
            raise ConditionsError(f"dataset {name!r} has no class list in fedmpt.data.classnames.BUILTIN_CLASSNAMES")
        paths.append(
            write_default(
                name,
                BUILTIN_CLASSNAMES[name],
                DEFAULT_CONDITIONS[name],
                note=DEFAULT_NOTES[name],
                directory=directory,
            )
        )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; ``--dataset NAME --classes FILE --conditions a,b,c --note TEXT`` adds one."""
    parser = argparse.ArgumentParser(prog="python -m fedmpt.conditions.defaults_build", description=__doc__)
    parser.add_argument("--directory", type=Path, default=DEFAULTS_DIR, help="output folder")
    parser.add_argument("--dataset", help="write only this dataset (a built-in one, or a new one with --classes)")
    parser.add_argument("--classes", type=Path, help="JSON list or one-per-line text file of class names")
    parser.add_argument("--conditions", help="comma-separated conditions (for a dataset given with --classes)")
    parser.add_argument("--note", help="provenance note (for a dataset given with --classes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.classes is not None:
            if not (args.dataset and args.conditions and args.note):
                parser.error("--classes needs --dataset, --conditions and --note")
            classnames = read_classnames_file(args.classes)
            conditions = [c.strip() for c in args.conditions.split(",")]
            paths = [write_default(args.dataset, classnames, conditions, note=args.note, directory=args.directory)]
        else:
            paths = write_all_defaults(args.directory, None if args.dataset is None else [args.dataset])
    except ConditionsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def read_classnames_file(path: str | Path) -> list[str]:
    """Read class names from a JSON list, or from a text file with one name per line (blank lines skipped)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConditionsError(f"class list {str(source)!r}: cannot read ({err})") from err
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConditionsError(f"class list {str(source)!r}: not valid JSON ({err})") from err
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ConditionsError(f"class list {str(source)!r}: expected a JSON list of strings")
        names = [x.strip() for x in data]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConditionsError(f"class list {str(source)!r} is empty")
    return names


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
