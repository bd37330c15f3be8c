"""The downstream record type (a plain dict per question, image-text pair or labelled image: see each reader) and the
field rules the VQA readers share: required fields, normalised answers, answer types, unique qids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from umd_lightning.data.answers import normalize_answer
from umd_lightning.data.common import DataError, OnError, check_text, safe_join
from umd_lightning.data.scan import ScanReport, scan

Record = dict[str, Any]


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
) -> Record:
    qid = str(qid)
    return {
        "qid": qid,
        "image": safe_join(image_root, image, file=file, record=qid),
        "image_id": str(image_id),
        "question": check_text(question, file=file, record=qid, what="question"),
        "answer": _answer(answer, file, qid),
        "answer_type": answer_type,
        "split": split,
    }


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
        if record["qid"] in seen:
            raise DataError(
                "duplicate_qid",
                file,
                record["qid"],
                "qid already used by an earlier question of this file (predictions are keyed by qid); make qids unique",
            )
        seen.add(record["qid"])
        return record

    records, report = scan(items, parse_unique, name=name, on_error=on_error, progress=False, skip_kinds=skip_kinds)
    if reports is not None:
        reports.append(report)
    return records
