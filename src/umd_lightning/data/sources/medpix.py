"""MedPix 2.0: ``splitted_dataset/descriptions_<split>.jsonl`` lines, the labelled records (classification) and the
(image, caption) pairs (retrieval); pre-training reads the same lines through :func:`parse_medpix_line`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from umd_lightning.data.common import DataError, OnError, check_label_column, check_text, safe_join
from umd_lightning.data.datasets import PairDataset, Transform
from umd_lightning.data.files import (
    _require_file,
    canonical_split,
    clean_text,
    parse_json_line,
    read_lines,
    require_files,
    string_field,
)
from umd_lightning.data.records import Record
from umd_lightning.data.scan import Filtered, ScanMode, ScanReport, add_report, scan

MEDPIX_LABEL_COLUMNS = ("Location Category", "Type")


def medpix_root(root: str | Path) -> Path:
    """The MedPix 2.0 folder holding ``splitted_dataset/``: ``root`` itself or its ``MedPix-2-0`` child."""
    root = Path(root)
    if not (root / "splitted_dataset").is_dir() and (root / "MedPix-2-0" / "splitted_dataset").is_dir():
        return root / "MedPix-2-0"
    return root


def medpix_records(
    root: str | Path,
    *,
    label_column: str = "Location Category",
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
) -> list[Record]:
    """MedPix 2.0: ``splitted_dataset/descriptions_{train,dev,test}.jsonl`` with images
    ``images/<image>.png``;
    text = ``Description.Caption``, label = ``Location Category`` (5 classes) or ``Type`` (CT / MR).

    Records also carry ``case`` (``U_id``): splits are by case, and captions repeat within a case.

    Raises:
        ValueError: unknown label column.
        FileNotFoundError: a split file is missing.
    """
    check_label_column("medpix", label_column, MEDPIX_LABEL_COLUMNS)
    root = medpix_root(root)
    files = {
        "train": "descriptions_train.jsonl",
        "val": "descriptions_dev.jsonl",
        "test": "descriptions_test.jsonl",
    }
    require_files(root, [f"splitted_dataset/{name}" for name in files.values()], "medpix")
    records: list[Record] = []
    for split, name in files.items():
        file = root / "splitted_dataset" / name
        lines = read_lines(file)

        def parse(item: tuple[int, bytes], file: Path = file, split: str = split) -> Record:
            number, raw = item
            entry, record_id, image, caption = parse_medpix_line(raw, root=root, file=file, line=number)
            return Record(
                id=record_id,
                image=image,
                texts=(caption,),
                label_name=check_text(entry.get(label_column), file=file, record=record_id, what=label_column),
                case=str(entry.get("U_id", "")),
                split=split,
            )

        kept, report = scan(lines, parse, name=f"medpix/{split}", on_error=on_error, progress=False)
        add_report(reports, report)
        records += kept
    return records


def parse_medpix_line(raw: bytes, *, root: Path, file: Path, line: int) -> tuple[dict[str, Any], str, Path, str]:
    """One line of MedPix 2.0's ``descriptions_<split>.jsonl`` -> ``(entry, image id, image path, caption)``: the
    image is ``images/<image>.png`` under ``root``, the caption ``Description.Caption`` with whitespace collapsed.

    Raises:
        DataError: ``bad_encoding``, ``bad_json``, ``bad_record``, ``empty_text`` or ``unsafe_path``.
    """
    entry = parse_json_line(raw, file=file, line=line)
    image = string_field(entry, "image", file=file, line=line)
    description = entry.get("Description")
    if not isinstance(description, dict):
        raise DataError("bad_record", file, image, "field 'Description' must be an object")
    caption = clean_text(description.get("Caption"), file=file, record=image, what="Description.Caption")
    path = safe_join(root / "images", f"{image}.png", file=file, record=image)
    return entry, image, path, caption


def medpix_pairs(
    root: str | Path, *, on_error: OnError = "raise", reports: list[ScanReport] | None = None
) -> list[Record]:
    """MedPix 2.0 (image, caption) pairs from its train / dev / test split files (see
    :func:`~umd_lightning.data.classification.medpix_records`); captions repeat within a case."""
    return [replace(r, label_name=None, case=None) for r in medpix_records(root, on_error=on_error, reports=reports)]


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

        def make_record(item: tuple[int, bytes]) -> Record | Filtered:
            line, raw = item
            _, image, path, caption = parse_medpix_line(raw, root=root, file=annotations, line=line)
            if excluded & {image, *image.split("_")}:
                return Filtered("excluded")
            return Record(id=image, image=path, file=str(annotations), texts=(caption,))

        self._load(read_lines(annotations), make_record)
