"""SLAKE 1.0: ``{train,validate,test}.json`` with English and Chinese questions (DATA.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from umd_lightning.data.common import DataError, OnError
from umd_lightning.data.files import read_json_list, require_files
from umd_lightning.data.records import Record, _answer_type, _field, _parse, _question_types, _record
from umd_lightning.data.scan import ScanReport

log = logging.getLogger(__name__)


def slake_records(
    root: str | Path,
    *,
    language: str | None = "en",
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
    skip_empty_answers: bool = False,
) -> list[Record]:
    """SLAKE 1.0: ``train.json``, ``validate.json``, ``test.json`` and ``imgs/<img_name>``.

    Args:
        language: keep questions with this ``q_lang`` (``en`` by default: the two languages use different
            image partitions, so mixing them leaks test images into training); ``None`` keeps all. Compared
            without case or surrounding spaces (``EN`` is English); a record without ``q_lang`` is a
            ``missing_field`` error; the questions of the other language are counted in the log.
        skip_empty_answers: skip and count (kind ``empty_answer``) records whose answer is empty, even with
            ``on_error="raise"``: the published ``train.json`` has one (an English question, qid 1622).
    """
    root = Path(root)
    files = {"train": "train.json", "val": "validate.json", "test": "test.json"}
    require_files(root, files.values(), "slake")
    records: list[Record] = []
    for split, name in files.items():
        file = root / name

        def parse(item: tuple[int, Any], file: Path = file, split: str = split) -> Record:
            position, entry = item
            qid = _field(entry, "qid", file, f"#{position}")
            if language is not None:
                lang = _field(entry, "q_lang", file, qid)
                if not isinstance(lang, str) or not lang.strip():
                    raise DataError("missing_field", file, qid, f"q_lang must be a language code, got {lang!r}")
            return _record(
                image_root=root / "imgs",
                file=file,
                qid=qid,
                image=_field(entry, "img_name", file, qid),
                image_id=_field(entry, "img_id", file, qid),
                question=_field(entry, "question", file, qid),
                answer=_field(entry, "answer", file, qid),
                answer_type=_answer_type(_field(entry, "answer_type", file, qid), file, qid),
                split=split,
                question_types=_question_types(entry.get("content_type")),
            )

        entries = list(enumerate(read_json_list(file)))
        items = [(position, entry) for position, entry in entries if _in_language(entry, language)]
        if len(items) < len(entries):
            log.info("slake/%s: %d of %d questions not in language %r left out", split, len(entries) - len(items),
                     len(entries), language)  # fmt: skip
        skip = frozenset({"empty_answer"}) if skip_empty_answers else frozenset()
        records += _parse(
            items, parse, file=file, name=f"slake/{split}", on_error=on_error, reports=reports, skip_kinds=skip
        )
    return records


def _in_language(entry: Any, language: str | None) -> bool:
    """Whether a SLAKE record is kept by the language filter; records without a usable ``q_lang`` are kept, so
    that the scan reports them."""
    if language is None or not isinstance(entry, dict):
        return True
    lang = entry.get("q_lang")
    if not isinstance(lang, str) or not lang.strip():
        return True
    return lang.strip().lower() == language.strip().lower()
