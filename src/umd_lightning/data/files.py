"""The file rules every reader follows: lines, JSON, CSV and required files read with the file (and line) named in
every error, texts checked and whitespace collapsed. Image opening and the on_error scan are in ``common``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from umd_lightning.data.common import (
    DataError,
    check_text,
    decode_utf8,
    read_text,
)


def collapse_whitespace(text: str) -> str:
    """Replace every run of whitespace (newlines included) with one space and strip the ends."""
    return " ".join(text.split())


def clean_text(value: Any, *, file: str | Path, record: str | int | None, what: str = "text") -> str:
    return collapse_whitespace(check_text(value, file=file, record=record, what=what))


def read_lines(path: Path) -> list[tuple[int, bytes]]:
    """Non-blank lines of a text file as ``(1-based line number, raw bytes)``; decoding happens per record (a
    byte-order mark before the first line is dropped).

    Raises:
        DataError: the file cannot be read (kind ``bad_annotation``).
    """
    try:
        with open(path, "rb") as handle:
            lines = [(number, line) for number, line in enumerate(handle, start=1)]
    except OSError as exc:
        raise DataError("bad_annotation", path, None, f"cannot read the file: {exc}") from exc
    if lines:
        lines[0] = (1, lines[0][1].removeprefix(b"\xef\xbb\xbf"))
    return [(number, line) for number, line in lines if line.strip()]


def decode_line(raw: bytes, *, file: Path, line: int) -> str:
    return decode_utf8(raw, file=file, record=f"line {line}").rstrip("\r\n")


def parse_json_line(raw: bytes, *, file: Path, line: int) -> dict[str, Any]:
    text = decode_line(raw, file=file, line=line)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an integer of too many digits, deep nesting
        raise DataError("bad_json", file, f"line {line}", f"invalid JSON: {str(exc)[:200]}") from exc
    if not isinstance(value, dict):
        raise DataError("bad_json", file, f"line {line}", f"expected a JSON object, got {type(value).__name__}")
    return value


def string_field(record: dict[str, Any], key: str, *, file: Path, line: int) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError("bad_record", file, f"line {line}", f"field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def canonical_split(split: str, names: dict[str, str], dataset: str) -> str:
    if split not in names:
        raise ValueError(f"{dataset}: unknown split {split!r}, expected one of {sorted(names)}")
    return names[split]


def read_csv_rows(path: Path, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV file (UTF-8 with or without a BOM; ``.gz`` decompressed), after checking that
    it has the ``required`` columns. A row with more fields than the header keeps them as a list under the key
    ``None``; a missing field is ``None``.

    Raises:
        DataError: ``missing_column`` (naming the column), ``bad_encoding`` or ``bad_annotation`` (a line the
            CSV parser refuses, such as one holding a NUL byte), naming the file; a file defect, always raised.
    """
    text = read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = list(reader.fieldnames or [])
        missing = [column for column in required if column not in columns]
        if missing:
            raise DataError("missing_column", path, None, f"missing column(s) {missing}; the header has {columns[:20]}")
        return columns, list(reader)
    except csv.Error as exc:
        raise DataError("bad_annotation", path, None, f"not a readable CSV file: {exc}") from exc


def read_json_list(path: Path) -> list[Any]:
    """Read a JSON file (UTF-8, with or without a byte-order mark) that must hold a list of records.

    Raises:
        DataError: ``bad_encoding`` (invalid UTF-8, with its byte offset) or ``bad_annotation`` (not valid JSON,
            or its top level is not a list), naming the file.
    """
    text = read_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an integer of too many digits, deep nesting
        raise DataError("bad_annotation", path, None, f"not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(data, list):
        raise DataError("bad_annotation", path, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def require_files(root: Path, names: Iterable[str], dataset: str) -> None:
    """Fail early, naming every expected file, when a layout's annotation files are not all there.

    Raises:
        FileNotFoundError: one or more of ``names`` is missing under ``root``.
    """
    names = list(names)
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dataset}: missing annotation file(s) {missing} under {root}; this layout expects {names}"
        )


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
