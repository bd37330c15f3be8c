"""The generic JSONL layout: ``image``, ``text`` (a string or a list) and ``split`` per line (DATA.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from umd_lightning.data.common import DataError, OnError, safe_join
from umd_lightning.data.datasets import PairDataset, Transform
from umd_lightning.data.files import (
    _parse_all,
    _require_file,
    clean_text,
)
from umd_lightning.data.records import Record
from umd_lightning.data.scan import Filtered, ScanMode

_VAL_ALIASES = ("val", "validation", "validate", "dev")


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

        def make_record(item: tuple[int, dict[str, Any] | DataError]) -> Record | Filtered:
            line, record = item
            if isinstance(record, DataError):
                raise record
            if split is not None:
                if "split" not in record:
                    return Filtered("no_split")
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
            return Record(id=name, image=path, file=str(annotations), texts=cleaned)

        self._load(items, make_record)
