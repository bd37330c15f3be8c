"""ImageCLEF VQA-Med 2019: the official release and M3AE's layout (DATA.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from umd_lightning.data.common import DataError, OnError, read_text
from umd_lightning.data.files import require_files
from umd_lightning.data.records import Record, _parse, _question_types, _record
from umd_lightning.data.scan import ScanReport

VQA_MED_CATEGORIES = ("modality", "plane", "organ", "abnormality")


DEFAULT_VQA_MED_CATEGORIES = ("modality", "plane", "organ")


def _check_categories(categories: Sequence[str] | None) -> list[str]:
    chosen = list(DEFAULT_VQA_MED_CATEGORIES if categories is None else categories)
    unknown = [c for c in chosen if c not in VQA_MED_CATEGORIES]
    if unknown or not chosen:
        raise ValueError(f"unknown VQA-Med-2019 categories {unknown}: choose from {list(VQA_MED_CATEGORIES)}")
    return chosen


def _pipe_lines(file: Path) -> list[tuple[int, list[str]]]:
    lines = read_text(file).splitlines()
    return [(number, line.split("|")) for number, line in enumerate(lines, start=1) if line.strip()]


def _pipe_parser(
    root: Path, file: Path, images: str, split: str, qid_prefix: str, fields: tuple[str, ...], category: str | None
) -> Callable[[tuple[int, list[str]]], Record]:
    """Lines ``image_id|question|answer`` of one ``category``, or (``category=None``) the test file's lines that
    carry it as a field."""

    def parse(item: tuple[int, list[str]]) -> Record:
        number, parts = item
        qid = f"{qid_prefix}:{number}"
        if len(parts) != len(fields):
            raise DataError("bad_line", file, f"line {number}", f"expected {len(fields)} '|'-separated fields {fields}")
        row = dict(zip(fields, parts))
        return _record(
            image_root=root / images,
            file=file,
            qid=qid,
            image=f"{row['image_id'].strip()}.jpg",
            image_id=row["image_id"].strip(),
            question=row["question"],
            answer=row["answer"],
            answer_type="open",
            split=split,
            question_types=_question_types(row.get("category", category)),
        )

    return parse


def vqa_med_2019_records(
    root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
) -> list[Record]:
    """ImageCLEF VQA-Med 2019, official release (training, validation and test folders under ``root``).

    Train / val questions come from ``QAPairsByCategory/C<k>_<Category>_{train,val}.txt``
    (``image_id|question|answer``); test from ``VQAMed2019Test/VQAMed2019_Test_Questions_w_Ref_Answers.txt``
    (``image_id|category|question|answer``). All questions are open.

    Args:
        categories: question categories to keep, from ``modality``, ``plane``, ``organ``, ``abnormality``;
            ``None`` = modality, plane, organ (abnormality excluded, as in M3AE).
    """
    root = Path(root)
    chosen = _check_categories(categories)
    numbered = {c: f"C{i}_{c.capitalize()}" for i, c in enumerate(VQA_MED_CATEGORIES, start=1)}
    folders = {
        "train": ("ImageClef-2019-VQA-Med-Training", "Train_images", "train"),
        "val": ("ImageClef-2019-VQA-Med-Validation", "Val_images", "val"),
    }
    test_file = "VQAMed2019Test/VQAMed2019_Test_Questions_w_Ref_Answers.txt"
    expected = [
        f"{folder}/QAPairsByCategory/{numbered[c]}_{suffix}.txt"
        for folder, _, suffix in folders.values()
        for c in chosen
    ]
    require_files(root, [*expected, test_file], "vqa_med_2019")
    records: list[Record] = []
    for split, (folder, images, suffix) in folders.items():
        for category in chosen:
            file = root / folder / "QAPairsByCategory" / f"{numbered[category]}_{suffix}.txt"
            parse = _pipe_parser(
                root,
                file,
                f"{folder}/{images}",
                split,
                f"{split}/{category}",
                ("image_id", "question", "answer"),
                category,
            )
            name = f"vqa_med_2019/{split}/{category}"
            records += _parse(_pipe_lines(file), parse, file=file, name=name, on_error=on_error, reports=reports)
    file = root / test_file
    parse = _pipe_parser(
        root,
        file,
        "VQAMed2019Test/VQAMed2019_Test_Images",
        "test",
        "test",
        ("image_id", "category", "question", "answer"),
        None,
    )
    # The category is a field of the test file, so a line is kept or dropped before parsing.
    lines = [(n, parts) for n, parts in _pipe_lines(file) if len(parts) != 4 or parts[1].strip().lower() in chosen]
    return records + _parse(lines, parse, file=file, name="vqa_med_2019/test", on_error=on_error, reports=reports)


def vqa_med_2019_m3ae_records(
    root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
) -> list[Record]:
    """VQA-Med 2019 in M3AE's layout: ``{train,val,test}/QA/<Category>.csv`` (``image_id|question|answer``,
    pipe-separated despite the name) and ``{split}/images/<image_id>.jpg``.

    Args:
        categories: as for :func:`vqa_med_2019_records`.
    """
    root = Path(root)
    chosen = _check_categories(categories)
    splits = ("train", "val", "test")
    require_files(root, [f"{s}/QA/{c.capitalize()}.csv" for s in splits for c in chosen], "vqa_med_2019_m3ae")
    records: list[Record] = []
    for split in splits:
        for category in chosen:
            file = root / split / "QA" / f"{category.capitalize()}.csv"
            parse = _pipe_parser(
                root,
                file,
                f"{split}/images",
                split,
                f"{split}/{category}",
                ("image_id", "question", "answer"),
                category,
            )
            name = f"vqa_med_2019_m3ae/{split}/{category}"
            records += _parse(_pipe_lines(file), parse, file=file, name=name, on_error=on_error, reports=reports)
    return records
