"""The one record type every source yields for every task it serves (``Record``: an image and its texts, question,
answer or label) and the field rules the VQA readers
share: required fields, normalised answers, answer types, unique qids. A record left out on purpose is a
``scan.Filtered``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umd_lightning.data.answers import normalize_answer
from umd_lightning.data.common import DataError, OnError, check_text, safe_join
from umd_lightning.data.scan import ScanReport, scan


@dataclass(frozen=True)
class Record:
    """One image and what a task reads with it; each source fills the fields of the tasks it serves.

    Attributes:
        id: the record's id, named in errors and predictions (ROCO name, figure name, ``dicom_id``, MedPix image
            name, a VQA question's ``qid``, ``<split>/<index>`` for MedMNIST).
        image: the image file inside the data root, or the image itself (MedMNIST's arrays).
        file: the annotation file it came from (pre-training sources; named in runtime errors).
        split: ``train`` / ``val`` / ``test`` for downstream readers, which read every split at once; ``None``
            for pre-training sources, which read one split per data set.
        texts: the texts paired with the image: one or more for pre-training, the caption for retrieval and
            classification (``text``); empty for VQA.
        question, answer, answer_type, image_id: VQA (the answer normalised, ``answer_type`` ``open`` or
            ``closed``, ``image_id`` the image's name, which the validation hold-out groups by).
        question_types: VQA: what the question asks about, for the per-type accuracy at test (VQA-RAD's
            ``question_type``, which may name two: ``("PRES", "POS")``; SLAKE's ``content_type``; VQA-Med's
            category); empty when the set has none.
        label_name: classification (the class's name; the DataModule maps it to an index).
        case: MedPix's case id (``U_id``).
    """

    id: str
    image: Any
    file: str = ""
    split: str | None = None
    texts: tuple[str, ...] = ()
    question: str | None = None
    answer: str | None = None
    answer_type: str | None = None
    image_id: str | None = None
    question_types: tuple[str, ...] = ()
    label_name: str | None = None
    case: str | None = None

    @property
    def text(self) -> str:
        """The record's one text (retrieval and classification captions, TD-Calib pairs)."""
        return self.texts[0]


def _field(entry: Any, key: str, file: Path, record: Any) -> Any:
    if not isinstance(entry, dict):
        raise DataError("bad_record", file, record, f"expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError("missing_field", file, record, f"field {key!r} is missing")
    return entry[key]


def _answer(raw: Any, file: Path, record: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise DataError("empty_text", file, record, f"answer must be a string or a number, got {raw!r}")
    try:
        answer = normalize_answer(raw)
    except ValueError as exc:  # NaN or Infinity (JSON accepts both literals)
        raise DataError("bad_answer", file, record, f"{exc}; give the answer as text") from exc
    if not answer:
        raise DataError("empty_answer", file, record, f"answer {raw!r} is empty after normalisation")
    return answer


def _answer_type(raw: Any, file: Path, record: Any) -> str:
    # VQA-RAD has "CLOSED " with a trailing space in two records.
    kind = raw.strip().lower() if isinstance(raw, str) else None
    if kind not in ("open", "closed"):
        raise DataError("bad_answer_type", file, record, f"answer_type must be OPEN or CLOSED, got {raw!r}")
    return kind


QUESTION_TYPE_SPELLINGS = {"ATRIB": "ATTRIB", "PRSE": "PRES"}
"""VQA-RAD's misspelt ``question_type`` values (one record each in the public release) and the type meant."""


def _question_types(raw: Any) -> tuple[str, ...]:
    """A question's types from a ``question_type`` / ``content_type`` / category value: comma-separated names,
    upper-cased, misspellings mended, in their order; ``()`` for a missing or empty value."""
    if not isinstance(raw, str):
        return ()
    names = [part.strip().upper() for part in raw.split(",") if part.strip()]
    return tuple(dict.fromkeys(QUESTION_TYPE_SPELLINGS.get(name, name) for name in names))


def _record(
    *,
    image_root: Path,
    file: Path,
    qid: Any,
    image: Any,
    image_id: Any,
    question: Any,
    answer: Any,
    answer_type: str,
    split: str,
    question_types: tuple[str, ...] = (),
) -> Record:
    qid = str(qid)
    return Record(
        id=qid,
        image=safe_join(image_root, image, file=file, record=qid),
        image_id=str(image_id),
        question=check_text(question, file=file, record=qid, what="question"),
        answer=_answer(answer, file, qid),
        answer_type=answer_type,
        question_types=question_types,
        split=split,
    )


def _parse(
    items: Sequence[Any],
    parse: Callable[[Any], Record],
    *,
    file: Path,
    name: str,
    on_error: OnError,
    reports: list[ScanReport] | None,
    skip_kinds: frozenset[str] = frozenset(),
) -> list[Record]:
    """Parse every item of one annotation file; a qid seen before in the file is a ``duplicate_qid`` error (the
    first question keeps it): predictions and per-question results are keyed by qid."""
    seen: set[str] = set()

    def parse_unique(item: Any) -> Record:
        record = parse(item)
        if record.id in seen:
            raise DataError(
                "duplicate_qid",
                file,
                record.id,
                "qid already used by an earlier question of this file (predictions are keyed by qid); make qids unique",
            )
        seen.add(record.id)
        return record

    records, report = scan(items, parse_unique, name=name, on_error=on_error, progress=False, skip_kinds=skip_kinds)
    if reports is not None:
        reports.append(report)
    return records
