"""MIMIC-CXR(-JPG): metadata and split CSVs, report sections, view filters (DATA.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umd_lightning.data.common import DataError, OnError, read_text, safe_join
from umd_lightning.data.datasets import PairDataset, Transform
from umd_lightning.data.files import (
    canonical_split,
    collapse_whitespace,
    read_csv_rows,
)
from umd_lightning.data.records import Record
from umd_lightning.data.scan import Filtered, ScanMode

MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"


MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"


_REPORT_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]*[A-Z)])[ \t]*:", re.MULTILINE)


def report_sections(report: str) -> dict[str, str]:
    """Split a free-text radiology report into ``{HEADER: text}`` by its upper-case ``HEADER:`` lines.

    Text before the first header is dropped; each section's whitespace is collapsed.
    """
    headers = list(_REPORT_HEADER.finditer(report))
    sections: dict[str, str] = {}
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(report)
        sections[header.group(1)] = collapse_whitespace(report[header.end() : end])
    return sections


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (optionally gzipped) file, after checking that it has the ``required`` columns.

    Raises:
        DataError: kind ``missing_column``, naming the file and the column (a file defect: always raised).
    """
    return read_csv_rows(path, required)[1]


def _cell(row: dict[str | None, Any], column: str) -> str:
    """A CSV cell stripped; ``""`` for a field missing from a short row."""
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def _find_csv(root: Path, name: str) -> Path:
    candidates = [root / name, root / f"{name}.gz"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"MIMIC-CXR file not found: expected {candidates[0]} (or {candidates[1].name})")


class MimicCxrDataset(PairDataset):
    """MIMIC-CXR(-JPG): metadata and split CSVs, JPEG images and free-text reports.

    Files: ``<root>/mimic-cxr-2.0.0-metadata.csv`` (``dicom_id``, ``subject_id``, ``study_id``,
    ``ViewPosition``), ``<root>/mimic-cxr-2.0.0-split.csv`` (``dicom_id``, ``split`` in train/validate/test;
    the gzipped ``.csv.gz`` of the release is read too), images
    ``<root>/files/p<first 2 digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg`` and reports
    ``<reports_root>/files/p<NN>/p<subject_id>/s<study_id>.txt``. The text of an image is its study's FINDINGS
    then IMPRESSION section; a study with neither is left out and counted as ``no_findings_impression``;
    images of other views are counted as ``other_view``. One record per image (``dicom_id``).

    Args:
        root: the MIMIC-CXR-JPG folder.
        split: ``train``, ``val`` (or ``validate``) or ``test``.
        transform: applied to the RGB PIL image.
        on_error: ``raise`` or ``skip`` bad records.
        scan: how deeply images are checked at set-up.
        views: ``ViewPosition`` values to keep; ``None`` keeps every view.
        reports_root: the folder holding the reports' ``files/`` (MIMIC-CXR, a separate release); ``None``
            means ``root``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        views: Sequence[str] | None = ("PA", "AP"),
        reports_root: str | Path | None = None,
    ) -> None:
        super().__init__(name=f"mimic_cxr/{split}", transform=transform, on_error=on_error, scan_mode=scan)
        root = Path(root)
        report_folder = Path(reports_root) if reports_root is not None else root
        canonical = canonical_split(
            split, {"train": "train", "val": "validate", "validate": "validate", "test": "test"}, "mimic_cxr"
        )
        metadata_file = _find_csv(root, MIMIC_METADATA)
        split_file = _find_csv(root, MIMIC_SPLIT)
        metadata = {
            _cell(row, "dicom_id"): row
            for row in _read_csv(metadata_file, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        }
        items = [row for row in _read_csv(split_file, ("dicom_id", "split")) if _cell(row, "split") == canonical]
        kept_views = None if views is None else {view.strip() for view in views}
        report_cache: dict[str, str | Filtered | DataError] = {}

        def study_text(subject: str, study: str, dicom: str) -> str | Filtered:
            """The study's report text, read once per study (its error or left-out outcome too)."""
            if study not in report_cache:
                try:
                    report_cache[study] = read_report(subject, study, dicom)
                except DataError as error:
                    report_cache[study] = error
            outcome = report_cache[study]
            if isinstance(outcome, DataError):
                raise outcome
            return outcome

        def read_report(subject: str, study: str, dicom: str) -> str | Filtered:
            relative = f"files/p{subject[:2]}/p{subject}/s{study}.txt"
            path = safe_join(report_folder, relative, file=split_file, record=dicom)
            if not path.is_file():
                raise DataError("missing_report", split_file, dicom, f"report not found: {path}")
            sections = report_sections(read_text(path, record=dicom))
            text = " ".join(part for part in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if part)
            if not text:
                return Filtered("no_findings_impression")
            return text

        def make_record(row: dict[str, str]) -> Record | Filtered:
            dicom = _cell(row, "dicom_id")
            meta = metadata.get(dicom)
            if meta is None:
                raise DataError("missing_metadata", split_file, dicom, f"dicom_id not in {metadata_file.name}")
            if kept_views is not None and _cell(meta, "ViewPosition") not in kept_views:
                return Filtered("other_view")
            subject, study = _cell(meta, "subject_id"), _cell(meta, "study_id")
            if not (subject.isdigit() and len(subject) >= 2 and study.isdigit()):
                raise DataError("bad_record", metadata_file, dicom, f"bad subject_id {subject!r} / study_id {study!r}")
            text = study_text(subject, study, dicom)
            if isinstance(text, Filtered):
                return text
            relative = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
            path = safe_join(root, relative, file=metadata_file, record=dicom)
            return Record(id=dicom, image=path, file=str(split_file), texts=(text,))

        self._load(items, make_record)
