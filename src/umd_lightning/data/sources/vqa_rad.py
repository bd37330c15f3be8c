"""VQA-RAD: the official OSF release and M3AE's preprocessed copy (DATA.md, "Downstream VQA")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from umd_lightning.data.common import DataError, OnError
from umd_lightning.data.files import read_json_list, require_files
from umd_lightning.data.records import Record, _answer_type, _field, _parse, _question_types, _record
from umd_lightning.data.scan import ScanReport


def _vqa_rad_entry(root: Path, file: Path, images: str, split_of: Callable[[dict], str]) -> Callable[[Any], Record]:
    def parse(item: tuple[int, Any]) -> Record:
        position, entry = item
        qid = _field(entry, "qid", file, f"#{position}")
        name = _field(entry, "image_name", file, qid)
        if not isinstance(name, str):
            raise DataError("bad_path", file, qid, f"image_name must be a string, got {name!r}")
        return _record(
            image_root=root / images,
            file=file,
            qid=qid,
            image=name,
            image_id=Path(name).stem,
            question=_field(entry, "question", file, qid),
            answer=_field(entry, "answer", file, qid),
            answer_type=_answer_type(_field(entry, "answer_type", file, qid), file, qid),
            split=split_of(entry),
            question_types=_question_types(entry.get("question_type")),
        )

    return parse


def vqa_rad_records(
    root: str | Path, *, on_error: OnError = "raise", reports: list[ScanReport] | None = None
) -> list[Record]:
    """VQA-RAD, official OSF release: ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/``.

    Questions whose ``phrase_type`` starts with ``test_`` form the test split (451), the rest train (1,797).
    There is no validation split.
    """
    root = Path(root)
    name = "VQA_RAD Dataset Public.json"
    require_files(root, [name], "vqa_rad")
    file = root / name

    def split_of(entry: dict) -> str:
        return "test" if str(entry.get("phrase_type", "")).startswith("test_") else "train"

    parse = _vqa_rad_entry(root, file, "VQA_RAD Image Folder", split_of)
    items = list(enumerate(read_json_list(file)))
    return _parse(items, parse, file=file, name="vqa_rad", on_error=on_error, reports=reports)


def vqa_rad_preprocessed_records(
    root: str | Path, *, on_error: OnError = "raise", reports: list[ScanReport] | None = None
) -> list[Record]:
    """VQA-RAD in M3AE's layout: ``trainset.json``, ``testset.json``, optional ``valset.json``, ``images/``.

    M3AE's ``valset.json`` is a copy of the test set; it is read as the ``val`` split when present.
    """
    root = Path(root)
    require_files(root, ["trainset.json", "testset.json"], "vqa_rad_preprocessed")
    records: list[Record] = []
    for split, name in (("train", "trainset.json"), ("val", "valset.json"), ("test", "testset.json")):
        file = root / name
        if not file.is_file():
            continue
        parse = _vqa_rad_entry(root, file, "images", lambda entry, split=split: split)
        items = list(enumerate(read_json_list(file)))
        report_name = f"vqa_rad_preprocessed/{split}"
        records += _parse(items, parse, file=file, name=report_name, on_error=on_error, reports=reports)
    return records
