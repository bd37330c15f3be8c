"""ROCO (radiology subset): its split folders, caption lines and the (image, caption) records every task reads."""

from __future__ import annotations

from pathlib import Path

from umd_lightning.data.common import DataError, OnError, safe_join
from umd_lightning.data.datasets import MIN_WORDS, PairDataset, Transform
from umd_lightning.data.files import (
    canonical_split,
    clean_text,
    decode_line,
    read_lines,
)
from umd_lightning.data.records import Record
from umd_lightning.data.scan import Filtered, ScanMode, ScanReport, add_report, scan

ROCO_SPLIT_FOLDERS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
"""ROCO's split folders; M3AE renames ``validation`` to ``val``, so both are accepted."""


def roco_captions_file(root: Path, split: str) -> Path:
    """The ``captions.txt`` of a ROCO split (``train``, ``val``/``validation``, ``test``).

    Raises:
        FileNotFoundError: none of the accepted paths exists (they are named).
    """
    canonical = canonical_split(split, {"train": "train", "val": "val", "validation": "val", "test": "test"}, "roco")
    candidates = [root / folder / "radiology" / "captions.txt" for folder in ROCO_SPLIT_FOLDERS[canonical]]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"ROCO captions not found: expected {' or '.join(map(str, candidates))}")


def parse_roco_line(raw: bytes, *, captions: Path, line: int) -> tuple[str, Path, str]:
    """One ``ROCO_<id>\t<caption>`` line -> ``(id, image path, caption with whitespace collapsed)``; the image is
    ``images/<id>.jpg`` beside ``captions`` and must stay inside that folder. A line with a second tab (a third
    column: keywords, CUIs, a pasted field) is refused rather than glued onto the caption.

    Raises:
        DataError: ``bad_encoding``, ``bad_line``, ``empty_text`` or ``unsafe_path``.
    """
    columns = decode_line(raw, file=captions, line=line).split("\t")
    name = columns[0].strip()
    if len(columns) < 2 or not name:
        raise DataError("bad_line", captions, f"line {line}", "expected 'ROCO_<id><TAB><caption>'")
    if len(columns) > 2:
        raise DataError(
            "bad_line",
            captions,
            f"line {line}",
            f"{len(columns)} tab-separated columns, expected 2 ('ROCO_<id><TAB><caption>'); remove the extra tab(s)",
        )
    caption = columns[1]
    text = clean_text(caption, file=captions, record=name, what="caption")
    path = safe_join(captions.parent / "images", f"{name}.jpg", file=captions, record=name)
    return name, path, text


def roco_records(
    root: str | Path,
    *,
    min_words: int = 3,
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
) -> list[Record]:
    """ROCO, radiology subset: ``<root>/{train,validation,test}/radiology/captions.txt`` (``val`` accepted for
    ``validation``, as M3AE renames it), tab-separated ``ROCO_<id>\\t<caption>``, images
    ``<split>/radiology/images/ROCO_<id>.jpg``.

    Whitespace in captions is collapsed; captions under ``min_words`` words are dropped (counted in the report
    as ``short_caption``, never an error).

    Raises:
        FileNotFoundError: a split's ``captions.txt`` is missing (the accepted paths are named).
    """
    root = Path(root)
    records: list[Record] = []
    for split in ROCO_SPLIT_FOLDERS:
        file = roco_captions_file(root, split)
        lines = read_lines(file)

        def parse(item: tuple[int, bytes], file: Path = file, split: str = split) -> Record | Filtered:
            number, raw = item
            image_id, image, text = parse_roco_line(raw, captions=file, line=number)
            # Short captions are a selection rule, not a data error: counted, never failing.
            if len(text.split()) < min_words:
                return Filtered("short_caption")
            return Record(id=image_id, image=image, texts=(text,), split=split)

        kept, report = scan(lines, parse, name=f"roco/{split}", on_error=on_error, progress=False)
        add_report(reports, report)
        records += kept
    return records


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

        def make_record(item: tuple[int, bytes]) -> Record | Filtered:
            line, raw = item
            name, path, text = parse_roco_line(raw, captions=captions, line=line)
            if len(text.split()) < min_words:
                return Filtered("short_caption")
            return Record(id=name, image=path, file=str(captions), texts=(text,))

        self._load(read_lines(captions), make_record)
