"""``umd data check``: scan a configuration's data without training and list every problem found.

``umd data check --config configs/finetune/vqa_rad.yaml [--split train,val,test] [--scan full|header] [--data.*]``

Reads the ``data:`` section of a stage YAML (``class_path`` + ``init_args``; the other sections are ignored),
builds that DataModule with ``on_error="skip"`` (so every bad record is counted instead of stopping at the first)
and runs, for each split, the same set-up scan that training runs: annotations are parsed and every image is
decoded (``--scan full``) or opened (``--scan header``: faster, misses truncated pixel data). It prints, per split,
the records read, the images checked and the problems by kind with the first few record ids and messages.

Exit status: 0 when no problem was found, 1 when there are problems, 2 on a configuration error (one line on
stderr). Records left out on purpose (a ROCO caption under 3 words, a lateral MIMIC-CXR view, ...) are listed as
filters, not problems; VQA answers outside the vocabulary are reported (they are scored wrong) but are not problems.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule

from umd_lightning.data.common import SPLITS
from umd_lightning.data.datamodule import PackedPretrainDataModule, PretrainDataModule
from umd_lightning.data.datamodules import DownstreamDataModule, VQADataModule
from umd_lightning.data.pretrain import build_pretrain_dataset
from umd_lightning.data.scan import ScanReport
from umd_lightning.errors import ConfigError, DataError

FILTER_KINDS = frozenset({"short_caption", "excluded", "other_view", "no_findings_impression", "no_split"})
"""Kinds the pre-training and retrieval loaders count for records left out on purpose (not data errors)."""
IMAGE_KINDS = frozenset({"missing_image", "bad_image", "image_too_large"})
"""Kinds of a record whose image file was looked at and failed."""


@dataclass
class SplitResult:
    """What the scan of one split found.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        reports: the scan reports of the split's datasets (one per source or file).
        images: image files checked.
        notes: facts worth showing that are not problems (answers outside the vocabulary).
        errors: file-level ``DataError``s that stopped the split (or one of its sources) from being read.
    """

    split: str
    reports: list[ScanReport] = field(default_factory=list)
    images: int = 0
    notes: list[str] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)

    @property
    def read(self) -> int:
        return sum(report.read for report in self.reports)

    def problems(self) -> Counter:
        counts = problems_of(self.reports)
        counts.update(error.kind for error in self.errors)
        return counts


def problems_of(reports: Sequence[ScanReport]) -> Counter:
    """Counts by kind of the data errors in ``reports`` (filters left out)."""
    counts: Counter = Counter()
    for report in reports:
        counts.update({kind: n for kind, n in report.problems.items() if kind not in FILTER_KINDS})
    return counts


def one_line(message: str) -> str:
    """A (jsonargparse) multi-line error message as one line, without the Union boilerplate."""
    noise = ("Does not validate against any of the Union", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>")
    noise += ("Given value type:", "Given value:")
    lines = [line.strip() for line in str(message).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(noise))


def read_data_section(path: str | Path) -> dict[str, Any]:
    """The ``data:`` mapping of a YAML configuration.

    Raises:
        ConfigError: unreadable file, invalid YAML, or no ``data`` mapping with a ``class_path``.
    """
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {one_line(str(exc))}") from exc
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or "class_path" not in data:
        raise ConfigError(f"{path} has no 'data:' section with a class_path")
    return data


def forced_section(data: dict[str, Any], scan: str) -> dict[str, Any]:
    """The ``data`` section with ``on_error: skip`` and the chosen ``scan`` everywhere (also in the options of
    each pre-training source, which would override the DataModule's)."""
    init_args = dict(data.get("init_args") or {})
    init_args.update(on_error="skip", scan=scan)
    if isinstance(init_args.get("sources"), list):
        init_args["sources"] = [
            {**source, "options": {**(source.get("options") or {}), "on_error": "skip", "scan": scan}}
            if isinstance(source, dict) and isinstance(source.get("options"), dict)
            else source
            for source in init_args["sources"]
        ]
    return {"class_path": data["class_path"], "init_args": init_args}


def build_datamodule(data: dict[str, Any]) -> LightningDataModule:
    """Validate ``data`` as ``umd fit`` does (jsonargparse) and build the DataModule.

    Its annotation files are read here for the downstream DataModules.

    Raises:
        ConfigError: invalid section, a class the check does not know, or a constructor error that is not a
            ``DataError`` (unknown label column, missing annotation file, ...).
        DataError: a file-level data problem found while reading the annotations (a JSON file that is not a
            list, a CSV without a required column).
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        parsed = parser.parse_object({"data": data}).data
    except Exception as exc:  # jsonargparse reports every validation problem as an ArgumentError
        raise ConfigError(one_line(str(exc))) from exc
    module_name, _, class_name = parsed.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(cls, PretrainDataModule | DownstreamDataModule):
        raise ConfigError(f"{parsed.class_path} is not a umd_lightning DataModule the check can scan")
    try:
        return cls(**parsed.init_args.as_dict())
    except DataError:
        raise
    except (OSError, TypeError, ValueError) as exc:
        raise ConfigError(f"{parsed.class_path}: {one_line(str(exc))}") from exc


def scan_split(datamodule: LightningDataModule, split: str) -> SplitResult:
    """Build one split of ``datamodule`` as its set-up does, scanning every record, and collect the reports.

    Raises:
        ConfigError: the split cannot be built for a reason that is not a data error.
    """
    result = SplitResult(split)
    try:
        if isinstance(datamodule, PretrainDataModule):
            name = datamodule.val_split if split == "val" else split
            # Source by source, so that one unreadable source does not hide the others' reports.
            for spec in datamodule.sources:
                try:
                    dataset = build_pretrain_dataset(spec, name, on_error=datamodule.on_error, scan=datamodule.scan)
                except DataError as error:
                    result.errors.append(error)
                    continue
                result.reports.append(dataset.report)
            # Each pre-training record has one image, opened when its annotation passed.
            result.images = sum(r.kept + sum(r.problems[k] for k in IMAGE_KINDS) for r in result.reports)
        else:
            dataset = datamodule._build(split)
            result.reports = list(getattr(dataset, "reports", []))
            result.images = sum(report.images for report in result.reports)
            if isinstance(datamodule, VQADataModule):
                outside = datamodule.out_of_vocabulary[split]
                result.notes.append(
                    f"{outside} answer(s) outside the {datamodule.vocab} vocabulary of "
                    f"{len(datamodule.answer_vocab)} (scored wrong)"
                )
    except DataError as error:
        result.errors.append(error)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"split {split}: {one_line(str(exc))}") from exc
    return result


def format_report(report: ScanReport, indent: str = "  ") -> list[str]:
    """A report as lines: the counts, then each problem kind with its first messages, then the filters."""
    lines = [f"{indent}{report.name}: {report.read} records read, {report.kept} kept"]
    for kind, count in sorted(report.problems.items()):
        if kind in FILTER_KINDS:
            continue
        lines.append(f"{indent}  {kind}: {count}")
        lines += [f"{indent}    {message}" for message in report.examples.get(kind, [])]
    for kind, count in sorted(report.notes.items()):
        lines.append(f"{indent}  kept, noted {kind}: {count}")
        lines += [f"{indent}    {message}" for message in report.note_examples.get(kind, [])]
    filtered = {kind: n for kind, n in report.problems.items() if kind in FILTER_KINDS}
    if filtered:
        lines.append(
            f"{indent}  left out by filters (not errors): " + ", ".join(f"{k} {n}" for k, n in sorted(filtered.items()))
        )
    return lines


def format_split(result: SplitResult, scan: str) -> list[str]:
    checked = "images decoded" if scan == "full" else "image headers checked"
    problems = sum(result.problems().values())
    lines = [f"{result.split}: {result.read} records read, {result.images} {checked}, {problems} problem(s)"]
    lines += [f"  cannot read: {error}" for error in result.errors]
    for report in result.reports:
        lines += format_report(report)
    lines += [f"  {note}" for note in result.notes]
    return lines


@contextmanager
def quiet_loggers() -> Iterator[None]:
    """Silence the loaders' own report logging while the check prints its report (restored afterwards)."""
    loggers = [logging.getLogger(name) for name in ("umd_lightning", "lightning.pytorch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def parse_splits(text: str) -> list[str]:
    splits = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise ConfigError(f"--split takes a comma-separated subset of {','.join(SPLITS)}, got {text!r}")
    return list(dict.fromkeys(splits))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umd data check",
        description=__doc__.split("\n\n")[2],
        epilog=__doc__.split("\n\n")[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="a stage YAML; its data: section is scanned")
    parser.add_argument("--split", default=",".join(SPLITS), help="comma-separated splits to scan (default: all)")
    parser.add_argument(
        "--scan",
        choices=("full", "header"),
        default="full",
        help="full: decode every image (finds truncated files); header: only open each image (faster)",
    )
    return parser


def parse_args_and_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """``parser``'s arguments and the ``--data.*`` overrides after them; a usage error for any other option.

    Raises:
        SystemExit: as argparse raises it, for ``--help`` (0) or a usage error (2), already printed.
    """
    args, overrides = parser.parse_known_args(argv)
    if any(arg.startswith("-") and not arg.startswith("--data.") for arg in overrides):
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (only --data.* overrides are taken)")
    return args, overrides


def with_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with ``--data.*`` command-line overrides applied as ``umd fit`` applies them (jsonargparse)."""
    if not overrides:
        return data
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        parsed = parser.parse_args(["--data", json.dumps(data), *overrides])
    except Exception as exc:
        raise ConfigError(one_line(str(exc))) from exc
    return json.loads(parser.dump(parsed, format="json", skip_check=True))["data"]


def run(config: str, splits: Sequence[str], scan: str, overrides: Sequence[str] = ()) -> int:
    """Scan and print; the exit status (0 clean, 1 problems).

    Raises:
        ConfigError: see :func:`build_datamodule` and :func:`scan_split`.
    """
    data = with_overrides(read_data_section(config), overrides)
    if str(data.get("class_path", "")).rpartition(".")[2] == PackedPretrainDataModule.__name__:
        pack = (data.get("init_args") or {}).get("pack")
        raise ConfigError(
            f"{config} reads the pack {pack}, which umd data pack checked when it wrote it (its manifest.json lists "
            "what was left out) and every run checks when it opens it: check the config it was packed from instead"
        )
    section = forced_section(data, scan)
    print(f"umd data check: {section['class_path']} from {config} (scan {scan}, splits {','.join(splits)})")
    try:
        datamodule = build_datamodule(section)
    except DataError as error:
        print(f"annotations: cannot be read: {error}")
        print(f"result: 1 problem ({error.kind}) -> exit 1")
        return 1
    totals: Counter = Counter()
    annotation_reports = list(getattr(datamodule, "scan_reports", []))
    if annotation_reports:
        totals += problems_of(annotation_reports)
        print(f"annotations: {sum(r.read for r in annotation_reports)} records read, {sum(totals.values())} problem(s)")
        for report in annotation_reports:
            print("\n".join(format_report(report)))
    for split in splits:
        result = scan_split(datamodule, split)
        totals += result.problems()
        print("\n".join(format_split(result, scan)))
    if not totals:
        print("result: no problems -> exit 0")
        return 0
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(totals.items()))
    print(f"result: {sum(totals.values())} problem(s): {kinds} -> exit 1")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``umd data check``; returns the exit status (0 clean, 1 problems, 2 configuration error)."""
    try:
        args, overrides = parse_args_and_overrides(make_parser(), argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    try:
        with quiet_loggers():
            return run(args.config, parse_splits(args.split), args.scan, overrides)
    except ConfigError as exc:
        print(f"umd data check: error: {exc}", file=sys.stderr)
        return 2
