"""The set-up scan: every record of a split checked once before training (``scan``), every distinct image file
opened as deeply as ``ScanMode`` asks (``scan_images``, ``check_image``), and what was found (``ScanReport``);
``on_error`` decides whether the first defect stops the run or is counted and dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from PIL import Image
from tqdm.auto import tqdm

from umd_lightning.data.common import NON_FINITE_INFO, OnError, check_image_header, load_image
from umd_lightning.errors import DataError

log = logging.getLogger(__name__)

ScanMode = Literal["full", "header", "none"]
"""How much of each image the set-up scan reads: ``full`` decodes it (finds truncated files), ``header`` opens it
(finds missing and non-image files), ``none`` only checks the annotation."""


class HasImage(Protocol):
    """What ``scan_images`` reads of a record (``records.Record`` has both)."""

    @property
    def id(self) -> str: ...

    @property
    def image(self) -> Any: ...


RecordT = TypeVar("RecordT", bound=HasImage)


@dataclass(frozen=True)
class Filtered:
    """What a record check returns for a record left out on purpose (a short caption, another view; not a data
    error): ``scan`` keeps nothing for it and counts it under ``kind`` in the report's problems."""

    kind: str


def check_image(path: Path, mode: ScanMode, *, file: str | Path, record: str | int | None) -> Any:
    """Check one image as deeply as the scan ``mode`` asks (see ``ScanMode``); the decoded image for
    ``full``, else ``None``.

    Raises:
        DataError: the image is missing or does not open / decode.
    """
    if mode == "full":
        return load_image(path, file=file, record=record)
    if mode == "header":
        check_image_header(path, file=file, record=record)
    elif mode != "none":
        raise ValueError(f"scan must be 'full', 'header' or 'none', got {mode!r}")
    return None


@dataclass
class ScanReport:
    """What a set-up scan found in one split.

    Attributes:
        name: the data set and split, e.g. ``roco/train``.
        read: records read from the annotations.
        kept: records that passed.
        problems: count of skipped records by kind.
        examples: the first few ``DataError`` messages of each kind.
        images: distinct image files opened by ``scan_images`` (0 when it did not check images).
        notes: kept records with something worth knowing, by kind (``non_finite_pixels``: a float image
            with NaN or infinite pixels, scaled by its finite ones).
        note_examples: the first few messages of each note kind.
        filtered: records left out on purpose, by kind (a ``Filtered`` from the record check; also counted in
            ``problems``).
    """

    name: str
    read: int = 0
    kept: int = 0
    images: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    note_examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, error: DataError) -> None:
        self.problems[error.kind] += 1
        shown = self.examples.setdefault(error.kind, [])
        if len(shown) < self.max_examples:
            shown.append(str(error))

    def note(self, kind: str, message: str) -> None:
        """Count a kept record under ``kind`` (not a problem: the record is used)."""
        self.notes[kind] += 1
        shown = self.note_examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(message)

    def note_image(self, image: Image.Image | None, path: Path, record: str | int | None) -> None:
        """Note a decoded image whose float pixels held NaN or infinite values (see :func:`to_rgb`)."""
        count = image.info.get(NON_FINITE_INFO, 0) if image is not None else 0
        if count:
            self.note(
                "non_finite_pixels",
                f"{path}, record {record}: {count} NaN/infinite pixel(s) left out of the intensity scaling",
            )

    @property
    def skipped(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        line = f"{self.name}: {self.read} records read, {self.kept} kept, {self.skipped} skipped"
        for kind, count in sorted(self.problems.items()):
            line += f"\n  {kind}: {count}" + "".join(f"\n    {msg}" for msg in self.examples.get(kind, []))
        for kind, count in sorted(self.notes.items()):
            shown = self.note_examples.get(kind, [])
            line += f"\n  kept, noted {kind}: {count}" + "".join(f"\n    {msg}" for msg in shown)
        return line


def require_samples(count: int, reports: Sequence[ScanReport], *, where: str | Path, split: str) -> None:
    """Stop a run whose ``split`` has no usable sample left, with the counts of the scans that emptied it.

    Raises:
        DataError: kind ``empty_split`` when ``count == 0``.
    """
    if count:
        return
    problems: Counter = Counter()
    for report in reports:
        problems.update(report.problems)
    read = sum(report.read for report in reports)
    found = ", ".join(f"{kind} {n}" for kind, n in sorted(problems.items())) or "nothing"
    raise DataError(
        "empty_split",
        where,
        None,
        f"no usable sample in the {split} split after the set-up scan ({read} records read; skipped: {found}); "
        "fix the files named in the scan report above (`umd data check` lists them) or point to other data",
    )


def scan(
    items: Iterable[Any],
    check: Callable[[Any], Any],
    *,
    name: str,
    on_error: OnError = "raise",
    total: int | None = None,
    progress: bool = True,
    skip_kinds: frozenset[str] = frozenset(),
) -> tuple[list[Any], ScanReport]:
    """Run ``check`` on every item at set-up; keep what passes, raise or count what fails.

    ``check`` returns the item to keep (possibly transformed), a ``Filtered`` for an item left out on purpose
    (counted by kind, never an error) or raises ``DataError``. Errors of a kind in
    ``skip_kinds`` are skipped and counted even with ``on_error="raise"`` (a known defect of a published file).

    Raises:
        DataError: the first failing item, when ``on_error == "raise"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = ScanReport(name=name)
    kept: list[Any] = []
    if total is None and isinstance(items, Sequence):
        total = len(items)
    for item in tqdm(items, total=total, desc=f"scan {name}", disable=not progress, leave=False):
        report.read += 1
        try:
            outcome = check(item)
        except DataError as error:
            if on_error == "raise" and error.kind not in skip_kinds:
                raise
            report.add(error)
            continue
        if isinstance(outcome, Filtered):
            report.filtered[outcome.kind] += 1
        else:
            kept.append(outcome)
    report.kept = len(kept)
    if report.skipped:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    # Left-out records count with the problems (``short_caption: 2``), after the data errors' summary above.
    report.problems.update(report.filtered)
    return kept, report


def scan_images(
    records: Sequence[RecordT],
    *,
    name: str,
    mode: ScanMode = "full",
    on_error: OnError = "raise",
    progress: bool = True,
) -> tuple[list[RecordT], ScanReport]:
    """Scan the image file of every record (``mode``: ``full`` decodes, ``header`` opens, ``none`` skips).

    An image shared by several records (VQA: many questions per image) is read once; every record that uses a
    bad image fails with that record's id. Records whose image is not a path (in-memory arrays) pass.

    Raises:
        DataError: the first bad image, when ``on_error == "raise"``.
        ValueError: unknown ``mode``.
    """
    if mode not in ("full", "header", "none"):
        raise ValueError(f"scan must be 'full', 'header' or 'none', got {mode!r}")
    checker = {"full": load_image, "header": check_image_header}.get(mode)
    verdicts: dict[Path, DataError | None] = {}
    noted = ScanReport(name=name)

    def check(record: RecordT) -> RecordT:
        path = record.image
        if checker is None or not isinstance(path, str | Path):
            return record
        path = Path(path)
        if path not in verdicts:
            try:
                noted.note_image(checker(path, record=record.id), path, record.id)
                verdicts[path] = None
            except DataError as error:
                verdicts[path] = error
        error = verdicts[path]
        if error is not None:
            raise DataError(error.kind, error.file, record.id, error.reason)
        return record

    kept, report = scan(records, check, name=name, on_error=on_error, progress=progress)
    report.images = len(verdicts)
    report.notes, report.note_examples = noted.notes, noted.note_examples
    if noted.notes:
        log.warning(report.summary())
    return kept, report


def add_report(reports: list[ScanReport] | None, report: ScanReport) -> None:
    if reports is not None:
        reports.append(report)
