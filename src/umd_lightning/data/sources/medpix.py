"""MedPix 2.0: ``splitted_dataset/descriptions_<split>.jsonl`` lines, the labelled records (classification) and the
(image, caption) pairs (retrieval); pre-training reads the same lines through :func:`parse_medpix_line`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from umd_lightning.data.common import (
    OnError,
    ScanReport,
    add_report,
    check_label_column,
    check_text,
    safe_join,
    scan,
)
from umd_lightning.data.files import (
    clean_text,
    parse_json_line,
    read_lines,
    require_files,
    string_field,
)
from umd_lightning.errors import DataError

Record = dict[str, Any]


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
            return {
                "id": record_id,
                "image": image,
                "text": caption,
                "label_name": check_text(entry.get(label_column), file=file, record=record_id, what=label_column),
                "case": str(entry.get("U_id", "")),
                "split": split,
            }

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
    return [
        {"id": r["id"], "image": r["image"], "text": r["text"], "split": r["split"]}
        for r in medpix_records(root, on_error=on_error, reports=reports)
    ]
