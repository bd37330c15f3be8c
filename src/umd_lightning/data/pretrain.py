"""Image-text pair datasets for pre-training and TD-Calib, one class per publisher layout.

DATA.md "Pre-training and retrieval" describes each layout. Every dataset:

- reads the annotations and checks every record at construction (``common.scan``): the text must be non-empty,
  the image path must stay inside the root, and the image is decoded (``scan="full"``), opened (``"header"``)
  or not touched (``"none"``); the outcome is kept as ``dataset.report`` (a ``ScanReport``);
- counts records left out on purpose (a ROCO caption under 3 words, a lateral MIMIC view, ...) in the report
  under their own kind, even with ``on_error="raise"``: they are filters, not errors;
- returns samples ``{"image": transform(RGB PIL image), "text": str, "id": str}``; one image with several
  texts gives one sample per text, all with the image's id (so a consumer can tell that two samples share an
  image);
- returns ``None`` from ``__getitem__`` under ``on_error="skip"`` when an image that passed the scan no longer
  decodes (the collate drops it), and raises the ``DataError`` under ``"raise"``.

``report.read`` and ``report.kept`` count annotation records (images, figures); ``len(dataset)`` counts pairs.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from umd_lightning.data.common import (
    DataError,
    OnError,
    RuntimeSkips,
    ScanMode,
    ScanReport,
    check_image_header,
    load_image,
    load_scanned_image,
    read_text,
    safe_join,
    scan,
)
from umd_lightning.data.files import (
    canonical_split,
    clean_text,
    collapse_whitespace,
    parse_json_line,
    read_csv_rows,
    read_lines,
    string_field,
)
from umd_lightning.data.sources.medpix import parse_medpix_line
from umd_lightning.data.sources.roco import parse_roco_line, roco_captions_file

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any]
Sample = dict[str, Any]

VQA_RAD_OVERLAP: tuple[str, ...] = (
    "synpic16520",
    "synpic19605",
    "synpic19853",
    "synpic20208",
    "synpic21028",
    "synpic22020",
    "synpic23571",
    "synpic24424",
    "synpic27142",
    "synpic32981",
    "synpic34054",
    "synpic35914",
    "synpic39460",
    "synpic43433",
    "synpic46720",
    "synpic46943",
    "synpic48714",
    "synpic48749",
    "synpic51426",
)
"""The 19 MedPix 2.0 ``synpic`` ids that are also VQA-RAD images (``../shared/data/SOURCES.md``)."""

MIN_WORDS = 3
"""ROCO captions and MedICaT in-text references with fewer words are left out (DATA.md)."""

_VAL_ALIASES = ("val", "validation", "validate", "dev")


class _Filtered(Exception):
    """Raised by a record check for a record left out on purpose (not a data error), counted as ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class ImageRecord:
    """One checked image and its texts.

    Attributes:
        path: the image file, inside the data root.
        id: the record's id (ROCO name, figure name, ``dicom_id``, MedPix image name, ...).
        file: the annotation file it came from (named in errors).
        texts: one or more non-empty texts paired with the image.
    """

    path: Path
    id: str
    file: str
    texts: tuple[str, ...]


def check_image(path: Path, mode: ScanMode, *, file: str | Path, record: str | int | None) -> Any:
    """Check one image as deeply as the scan ``mode`` asks (see ``common.ScanMode``); the decoded image for
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


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected {path}")
    return path


def _parse_all(path: Path) -> list[tuple[int, dict[str, Any] | DataError]]:
    """Parse every line of a JSONL file, keeping a line's ``DataError`` in place of its object."""
    parsed: list[tuple[int, dict[str, Any] | DataError]] = []
    for line, raw in read_lines(path):
        try:
            parsed.append((line, parse_json_line(raw, file=path, line=line)))
        except DataError as error:
            parsed.append((line, error))
    return parsed


class PairDataset(Dataset):
    """Base of the pair datasets: holds the checked images, the (image, text) pairs and the scan report.

    Subclasses read their layout and call ``_load`` once with the raw records and a function that turns one
    raw record into an ``ImageRecord`` (``DataError`` for a defect, ``_Filtered`` for a record left out).
    """

    def __init__(self, *, name: str, transform: Transform | None, on_error: OnError, scan_mode: ScanMode) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if scan_mode not in ("full", "header", "none"):
            raise ValueError(f"scan must be 'full', 'header' or 'none', got {scan_mode!r}")
        self.name = name
        self.transform = transform
        self.on_error: OnError = on_error
        self.scan_mode: ScanMode = scan_mode
        self.images: list[ImageRecord] = []
        self.pairs: list[tuple[int, int]] = []
        self.report = ScanReport(name=name)
        self.skips = RuntimeSkips()
        """Samples dropped after the scan because their image stopped decoding (``on_error="skip"``)."""

    def _load(self, items: Sequence[Any], make_record: Callable[[Any], ImageRecord]) -> None:
        filtered: Counter = Counter()

        def check(item: Any) -> ImageRecord | None:
            try:
                record = make_record(item)
            except _Filtered as left_out:
                filtered[left_out.kind] += 1
                return None
            noted.note_image(
                check_image(record.path, self.scan_mode, file=record.file, record=record.id), record.path, record.id
            )
            return record

        noted = ScanReport(name=self.name)
        kept, report = scan(items, check, name=self.name, on_error=self.on_error)
        self.images = [record for record in kept if record is not None]
        report.kept = len(self.images)
        report.problems.update(filtered)
        report.notes, report.note_examples = noted.notes, noted.note_examples
        if noted.notes:
            log.warning(report.summary())
        if filtered:
            log.info("after filters: %s", report.summary())
        self.report = report
        self.pairs = [(i, j) for i, record in enumerate(self.images) for j in range(len(record.texts))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample | None:
        """Return ``{"image": FloatTensor (3, H, W) (PIL RGB without a transform), "text": str, "id": str}``.

        Returns ``None`` (under ``on_error="skip"``) when the image no longer decodes.

        Raises:
            DataError: the image no longer decodes and ``on_error == "raise"``.
        """
        image_index, text_index = self.pairs[index]
        record = self.images[image_index]
        image = load_scanned_image(
            record.path, on_error=self.on_error, file=record.file, record=record.id, skips=self.skips
        )
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "text": record.texts[text_index], "id": record.id}


class RocoDataset(PairDataset):
    """ROCO, radiology subset: ``<root>/<split>/radiology/captions.txt`` with lines ``ROCO_<id>\\t<caption>``.

    Images are ``<root>/<split>/radiology/images/ROCO_<id>.jpg``; the validation folder may be named
    ``validation`` (the release) or ``val`` (M3AE). Captions have their whitespace collapsed; captions under
    ``min_words`` words are left out and counted as ``short_caption``.

    Args:
        root: the folder holding ``train/``, ``validation/`` (or ``val/``) and ``test/``.
        split: ``train``, ``val`` (or ``validation``) or ``test``.
        transform: applied to the RGB PIL image.
        on_error: ``raise`` fails at the first bad record; ``skip`` drops and counts it.
        scan: how deeply images are checked at set-up.
        min_words: shorter captions are left out.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        min_words: int = MIN_WORDS,
    ) -> None:
        super().__init__(name=f"roco/{split}", transform=transform, on_error=on_error, scan_mode=scan)
        captions = roco_captions_file(Path(root), split)

        def make_record(item: tuple[int, bytes]) -> ImageRecord:
            line, raw = item
            name, path, text = parse_roco_line(raw, captions=captions, line=line)
            if len(text.split()) < min_words:
                raise _Filtered("short_caption")
            return ImageRecord(path=path, id=name, file=str(captions), texts=(text,))

        self._load(read_lines(captions), make_record)


MEDICAT_ANNOTATIONS = "release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"


def medicat_holdout_size(num_figures: int, holdout: int = 1000) -> int:
    """Figures held out for each of val and test: ``holdout``, scaled down to 10% of a small file's figures.

    ``min(holdout, num_figures // 10)``, with 1 instead of 0 for 3 to 9 figures, so a tiny file still has a
    val and a test split (the paper's 1,000 + 1,000 need 10,000 figures or more). ``holdout=0`` puts every
    figure in train.
    """
    scaled = num_figures // 10 if num_figures >= 10 or num_figures < 3 else 1
    return min(holdout, scaled)


class MedicatDataset(PairDataset):
    """MedICaT: ``<root>/release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl``.

    One figure per line, image ``<root>/release/figures/<pdf_hash>_<fig_uri>``. Texts: ``s2_caption`` and each
    entry of ``s2orc_references`` (may be null) with at least ``min_words`` words; each text is one pair.

    There is no official split: the figures that pass the ``radiology`` filter and parse are sorted by id and
    shuffled with ``seed``; the first ``medicat_holdout_size(n, holdout)`` are val, the next as many test, the
    rest train (DATA.md: 1,000 val and 1,000 test). The split depends only on the annotation file, ``seed``
    and ``holdout``, never on which images fail the scan. Lines that do not parse are reported in every split;
    figures left out by ``radiology_only`` are in no split and only logged.

    Args:
        root: the folder holding ``release/``.
        split: ``train``, ``val`` or ``test``.
        transform: applied to the RGB PIL image.
        on_error: ``raise`` or ``skip`` bad records.
        scan: how deeply images are checked at set-up.
        radiology_only: keep only figures whose ``radiology`` field is ``true``.
        seed: seed of the hold-out shuffle.
        holdout: figures held out for each of val and test (scaled down for small files, see above).
        min_words: in-text references with fewer words are not used.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        radiology_only: bool = True,
        seed: int = 0,
        holdout: int = 1000,
        min_words: int = MIN_WORDS,
    ) -> None:
        super().__init__(name=f"medicat/{split}", transform=transform, on_error=on_error, scan_mode=scan)
        root = Path(root)
        canonical = canonical_split(
            split, {"train": "train", "val": "val", "validation": "val", "test": "test"}, "medicat"
        )
        annotations = _require_file(root / MEDICAT_ANNOTATIONS, "MedICaT annotations")
        parsed = _parse_all(annotations)

        def figure_id(record: dict[str, Any]) -> str | None:
            pdf_hash, fig_uri = record.get("pdf_hash"), record.get("fig_uri")
            if isinstance(pdf_hash, str) and isinstance(fig_uri, str):
                return f"{pdf_hash}_{fig_uri}"
            return None

        eligible: dict[str, None] = {}
        left_out = 0
        for _, record in parsed:
            if isinstance(record, DataError) or figure_id(record) is None:
                continue
            if radiology_only and record.get("radiology") is not True:
                left_out += 1
                continue
            eligible[figure_id(record)] = None
        if left_out:
            log.info("medicat: %d figures are not radiology and are left out (radiology_only=True)", left_out)
        order = sorted(eligible)
        shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
        size = medicat_holdout_size(len(order), holdout)
        splits = {"val": shuffled[:size], "test": shuffled[size : 2 * size], "train": shuffled[2 * size :]}
        chosen = set(splits[canonical])
        items = [
            (line, record)
            for line, record in parsed
            if isinstance(record, DataError) or figure_id(record) is None or figure_id(record) in chosen
        ]

        def make_record(item: tuple[int, dict[str, Any] | DataError]) -> ImageRecord:
            line, record = item
            if isinstance(record, DataError):
                raise record
            pdf_hash = string_field(record, "pdf_hash", file=annotations, line=line)
            fig_uri = string_field(record, "fig_uri", file=annotations, line=line)
            name = f"{pdf_hash}_{fig_uri}"
            texts = [clean_text(record.get("s2_caption"), file=annotations, record=name, what="s2_caption")]
            references = record.get("s2orc_references") or []
            if not isinstance(references, list):
                raise DataError("bad_record", annotations, name, "s2orc_references must be a list or null")
            for reference in references:
                if not isinstance(reference, str):
                    raise DataError("bad_record", annotations, name, f"s2orc reference {reference!r} is no string")
                reference = collapse_whitespace(reference)
                if len(reference.split()) >= min_words:
                    texts.append(reference)
            path = safe_join(root, f"release/figures/{name}", file=annotations, record=name)
            return ImageRecord(path=path, id=name, file=str(annotations), texts=tuple(texts))

        self._load(items, make_record)


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
        report_cache: dict[str, str | Exception] = {}

        def study_text(subject: str, study: str, dicom: str) -> str:
            if study not in report_cache:
                try:
                    report_cache[study] = read_report(subject, study, dicom)
                except (DataError, _Filtered) as outcome:
                    report_cache[study] = outcome
            outcome = report_cache[study]
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        def read_report(subject: str, study: str, dicom: str) -> str:
            relative = f"files/p{subject[:2]}/p{subject}/s{study}.txt"
            path = safe_join(report_folder, relative, file=split_file, record=dicom)
            if not path.is_file():
                raise DataError("missing_report", split_file, dicom, f"report not found: {path}")
            sections = report_sections(read_text(path, record=dicom))
            text = " ".join(part for part in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if part)
            if not text:
                raise _Filtered("no_findings_impression")
            return text

        def make_record(row: dict[str, str]) -> ImageRecord:
            dicom = _cell(row, "dicom_id")
            meta = metadata.get(dicom)
            if meta is None:
                raise DataError("missing_metadata", split_file, dicom, f"dicom_id not in {metadata_file.name}")
            if kept_views is not None and _cell(meta, "ViewPosition") not in kept_views:
                raise _Filtered("other_view")
            subject, study = _cell(meta, "subject_id"), _cell(meta, "study_id")
            if not (subject.isdigit() and len(subject) >= 2 and study.isdigit()):
                raise DataError("bad_record", metadata_file, dicom, f"bad subject_id {subject!r} / study_id {study!r}")
            text = study_text(subject, study, dicom)
            relative = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
            path = safe_join(root, relative, file=metadata_file, record=dicom)
            return ImageRecord(path=path, id=dicom, file=str(split_file), texts=(text,))

        self._load(items, make_record)


class MedPixDataset(PairDataset):
    """MedPix 2.0: ``<root>/splitted_dataset/descriptions_<split>.jsonl`` and ``<root>/images/<image>.png``.

    The text is ``Description.Caption`` (whitespace collapsed); the id is the ``image`` stem
    (``MPX<case>_synpic<id>``). Excluded images are counted as ``excluded``.

    Args:
        root: the ``MedPix-2-0`` folder.
        split: ``train``, ``dev`` (or ``val``), ``test``, or the halves ``train_1`` / ``train_2``.
        transform: applied to the RGB PIL image.
        on_error: ``raise`` or ``skip`` bad records.
        scan: how deeply images are checked at set-up.
        exclude_ids: images to leave out, each given as a full image name (``MPX1007_synpic46720``) or a
            ``synpic`` id (``synpic46720``); ids match whole ``_``-separated parts of the name, so
            ``synpic1652`` does not exclude ``synpic16520``.
        exclude_vqa_rad_overlap: leave out the 19 images shared with VQA-RAD (``VQA_RAD_OVERLAP``; 10 of them are
            VQA-RAD test images). On by default, since the pre-trained model is usually evaluated on VQA-RAD; set
            it to false only for a model that will never be.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        exclude_ids: Sequence[str] = (),
        exclude_vqa_rad_overlap: bool = True,
    ) -> None:
        super().__init__(name=f"medpix/{split}", transform=transform, on_error=on_error, scan_mode=scan)
        root = Path(root)
        names = {name: name for name in ("train", "dev", "test", "train_1", "train_2")}
        canonical = canonical_split(split, {**names, "val": "dev"}, "medpix")
        annotations = _require_file(
            root / "splitted_dataset" / f"descriptions_{canonical}.jsonl", "MedPix 2.0 descriptions"
        )
        excluded = set(exclude_ids) | (set(VQA_RAD_OVERLAP) if exclude_vqa_rad_overlap else set())

        def make_record(item: tuple[int, bytes]) -> ImageRecord:
            line, raw = item
            _, image, path, caption = parse_medpix_line(raw, root=root, file=annotations, line=line)
            if excluded & {image, *image.split("_")}:
                raise _Filtered("excluded")
            return ImageRecord(path=path, id=image, file=str(annotations), texts=(caption,))

        self._load(read_lines(annotations), make_record)


JSONL_SPLITS = ("train", *_VAL_ALIASES, "test")
"""The ``split`` values a JSONL record may carry (compared without case and surrounding spaces)."""


def _same_split(value: str, split: str) -> bool:
    value, split = value.strip().lower(), split.strip().lower()
    if value in _VAL_ALIASES and split in _VAL_ALIASES:
        return True
    return value == split


class JsonlDataset(PairDataset):
    """Generic JSONL, one object per line: ``{"image": path, "text": str | list[str], "split"?, "id"?}``.

    ``image`` is relative to the JSONL file's folder (and must stay inside it); a list of texts gives one pair
    per text. The id is ``id`` when given, else the image path.

    Args:
        path: the JSONL file.
        split: keep the records whose ``split`` equals it, ignoring case and surrounding spaces (``val``,
            ``validation``, ``validate`` and ``dev`` are one split); ``None`` keeps every record. With a split,
            records without a ``split`` field are counted as ``no_split``, a ``split`` that names no known split
            (``trian``) is a data error (``unknown_split``) reported in every split, and a file where no record
            has a ``split`` is an error.
        transform: applied to the RGB PIL image.
        on_error: ``raise`` or ``skip`` bad records.
        scan: how deeply images are checked at set-up.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        transform: Transform | None = None,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
    ) -> None:
        super().__init__(
            name=f"jsonl/{Path(path).stem}/{split or 'all'}",
            transform=transform,
            on_error=on_error,
            scan_mode=scan,
        )
        annotations = _require_file(Path(path), "JSONL annotations")
        root = annotations.parent
        parsed = _parse_all(annotations)
        items = parsed
        if split is not None:
            if not any(isinstance(record, dict) and "split" in record for _, record in parsed):
                raise DataError("no_split", annotations, None, f"no record has a 'split' field to select {split!r}")
            items = [
                (line, record)
                for line, record in parsed
                if not isinstance(record, dict)
                or "split" not in record
                or not isinstance(record["split"], str)
                or record["split"].strip().lower() not in JSONL_SPLITS
                or _same_split(record["split"], split)
            ]

        def make_record(item: tuple[int, dict[str, Any] | DataError]) -> ImageRecord:
            line, record = item
            if isinstance(record, DataError):
                raise record
            if split is not None:
                if "split" not in record:
                    raise _Filtered("no_split")
                if not isinstance(record["split"], str):
                    raise DataError("bad_record", annotations, f"line {line}", "field 'split' must be a string")
                if record["split"].strip().lower() not in JSONL_SPLITS:
                    raise DataError(
                        "unknown_split",
                        annotations,
                        f"line {line}",
                        f"split {record['split'][:50]!r} is none of train, val (validation, validate, dev), test",
                    )
            image = record.get("image")
            name = str(record["id"]) if "id" in record else image if isinstance(image, str) else f"line {line}"
            texts = record.get("text")
            if isinstance(texts, list):
                if not texts:
                    raise DataError("empty_text", annotations, name, "field 'text' is an empty list")
                cleaned = tuple(clean_text(text, file=annotations, record=name) for text in texts)
            else:
                cleaned = (clean_text(texts, file=annotations, record=name),)
            path = safe_join(root, image, file=annotations, record=name)
            return ImageRecord(path=path, id=name, file=str(annotations), texts=cleaned)

        self._load(items, make_record)


SourceFormat = Literal["roco", "medicat", "mimic_cxr", "medpix", "jsonl"]

DATASET_CLASSES: dict[str, type[PairDataset]] = {
    "roco": RocoDataset,
    "medicat": MedicatDataset,
    "mimic_cxr": MimicCxrDataset,
    "medpix": MedPixDataset,
    "jsonl": JsonlDataset,
}


def register_source(format: str, dataset_class: type[PairDataset]) -> None:
    """Add a pre-training source format: ``SourceSpec(format=...)`` and :func:`build_pretrain_dataset` then build
    ``dataset_class(root, split=..., transform=..., on_error=..., scan=..., **options)`` for it (CONTRIBUTING.md,
    "Adding a data set"). A format shipped with the package is also added to ``SourceFormat``, so YAML configs
    validate it.

    Raises:
        ValueError: the format is registered already.
        TypeError: ``dataset_class`` is not a :class:`PairDataset`.
    """
    if format in DATASET_CLASSES:
        raise ValueError(f"source format {format!r} is registered already ({DATASET_CLASSES[format].__name__})")
    if not (isinstance(dataset_class, type) and issubclass(dataset_class, PairDataset)):
        raise TypeError(f"a source format needs a PairDataset subclass, got {dataset_class!r}")
    DATASET_CLASSES[format] = dataset_class


@dataclass
class SourceSpec:
    """One pre-training source, as written in YAML: ``{format: roco, root: /data/roco, options: {...}}``.

    Attributes:
        format: the publisher layout: ``roco``, ``medicat``, ``mimic_cxr``, ``medpix`` or ``jsonl``.
        root: the data set's folder (for ``jsonl``, the JSONL file).
        options: keyword arguments of the format's dataset class, e.g. ``{views: [PA]}`` for ``mimic_cxr`` or
            ``{exclude_vqa_rad_overlap: true}`` for ``medpix``; ``on_error`` and ``scan`` here override the
            DataModule's.
    """

    format: SourceFormat
    root: str
    options: dict[str, Any] = field(default_factory=dict)


def source_options(format: str) -> list[str]:
    """The options a source of this format accepts (its dataset class's keyword arguments).

    Raises:
        ValueError: unknown format (the message lists the valid ones).
    """
    if format not in DATASET_CLASSES:
        raise ValueError(f"unknown source format {format!r}: choose one of {sorted(DATASET_CLASSES)}")
    parameters = list(inspect.signature(DATASET_CLASSES[format].__init__).parameters)
    # self, the root/path, the split and the transform are set by the caller, not by options.
    return [name for name in parameters[2:] if name not in ("split", "transform")]


def build_pretrain_dataset(
    spec: SourceSpec,
    split: str,
    transform: Transform | None = None,
    *,
    on_error: OnError = "raise",
    scan: ScanMode = "full",
) -> PairDataset:
    """Build one source's dataset for ``split`` (each class maps ``val`` to its own name for the split).

    ``on_error`` and ``scan`` apply unless ``spec.options`` sets them.

    Raises:
        ValueError: unknown format or option (the message lists the valid ones).
    """
    valid = source_options(spec.format)
    unknown = sorted(set(spec.options) - set(valid))
    if unknown:
        raise ValueError(f"{spec.format} source at {spec.root}: unknown option(s) {unknown}, valid options: {valid}")
    options = {"on_error": on_error, "scan": scan, **spec.options}
    return DATASET_CLASSES[spec.format](spec.root, split=split, transform=transform, **options)


class PretrainConcatDataset(ConcatDataset):
    """Several sources' datasets end to end, keeping each source's scan report."""

    datasets: list[PairDataset]

    @property
    def reports(self) -> list[ScanReport]:
        return [dataset.report for dataset in self.datasets]


def build_pretrain_datasets(
    specs: Iterable[SourceSpec],
    split: str,
    transform: Transform | None = None,
    *,
    on_error: OnError = "raise",
    scan: ScanMode = "full",
) -> PretrainConcatDataset:
    """Build every source's dataset for ``split`` and concatenate them (see ``build_pretrain_dataset``)."""
    datasets = [build_pretrain_dataset(spec, split, transform, on_error=on_error, scan=scan) for spec in specs]
    if not datasets:
        raise ValueError("no pre-training sources given")
    return PretrainConcatDataset(datasets)
