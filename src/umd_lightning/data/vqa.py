"""Medical VQA data sets as their publishers ship them (DATA.md, "Downstream VQA"), the dataset and collate.

Each ``*_records`` function reads one layout's annotation files (no image is opened) and returns plain dict
records::

    {"qid": str, "image": Path, "image_id": str, "question": str, "answer": str (normalised),
     "answer_type": "open" | "closed", "split": "train" | "val" | "test"}

A bad annotation record (empty question, unsafe image path, ...) raises ``DataError`` or, with
``on_error="skip"``, is dropped and counted in a ``ScanReport`` appended to ``reports`` when one is given.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from umd_lightning.data.answers import AnswerVocab, normalize_answer
from umd_lightning.data.common import (
    DataError,
    OnError,
    RuntimeSkips,
    ScanMode,
    ScanReport,
    check_text,
    load_scanned_image,
    read_text,
    safe_join,
    scan,
    scan_images,
)
from umd_lightning.data.files import read_json_list, require_files

VQADatasetName = Literal["vqa_rad", "vqa_rad_preprocessed", "slake", "vqa_med_2019", "vqa_med_2019_m3ae"]
VQA_MED_CATEGORIES = ("modality", "plane", "organ", "abnormality")
DEFAULT_VQA_MED_CATEGORIES = ("modality", "plane", "organ")

Record = dict[str, Any]

log = logging.getLogger(__name__)


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
    root: Path, file: Path, images: str, split: str, qid_prefix: str, fields: tuple[str, ...]
) -> Callable[[tuple[int, list[str]]], Record]:
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
            )
            name = f"vqa_med_2019_m3ae/{split}/{category}"
            records += _parse(_pipe_lines(file), parse, file=file, name=name, on_error=on_error, reports=reports)
    return records


def read_vqa_records(
    dataset: VQADatasetName,
    root: str | Path,
    *,
    language: str | None = "en",
    categories: Sequence[str] | None = None,
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
    skip_empty_answers: bool = False,
) -> list[Record]:
    """Read any supported VQA layout by name (``language`` and ``skip_empty_answers`` apply to SLAKE,
    ``categories`` to VQA-Med).

    Raises:
        ValueError: unknown data set name (the message lists the valid ones).
    """
    if dataset == "vqa_rad":
        return vqa_rad_records(root, on_error=on_error, reports=reports)
    if dataset == "vqa_rad_preprocessed":
        return vqa_rad_preprocessed_records(root, on_error=on_error, reports=reports)
    if dataset == "slake":
        return slake_records(
            root, language=language, on_error=on_error, reports=reports, skip_empty_answers=skip_empty_answers
        )
    if dataset == "vqa_med_2019":
        return vqa_med_2019_records(root, categories=categories, on_error=on_error, reports=reports)
    if dataset == "vqa_med_2019_m3ae":
        return vqa_med_2019_m3ae_records(root, categories=categories, on_error=on_error, reports=reports)
    valid = ["vqa_rad", "vqa_rad_preprocessed", "slake", "vqa_med_2019", "vqa_med_2019_m3ae"]
    raise ValueError(f"unknown VQA data set {dataset!r}: choose one of {valid}")


def holdout_by_image(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split records into (train, val) by image: a seeded ``fraction`` of the distinct images, with all their
    questions, goes to val, so no image is in both.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or fewer than two distinct images.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    images = sorted({record["image_id"] for record in records})
    if len(images) < 2:
        raise ValueError(f"cannot hold out images for validation from {len(images)} distinct image(s)")
    random.Random(seed).shuffle(images)
    count = min(len(images) - 1, max(1, round(fraction * len(images))))
    held = set(images[:count])
    train = [record for record in records if record["image_id"] not in held]
    val = [record for record in records if record["image_id"] in held]
    return train, val


class VQADataset(Dataset):
    """VQA samples from records; the images are scanned at construction.

    Args:
        records: records from a ``*_records`` function.
        transform: PIL RGB image -> ``(3, H, W)`` tensor.
        answer_vocab: the label space; an answer outside it gets ``answer_index = -1`` (counted as wrong).
        name: name in the scan report.
        on_error: ``raise`` fails on the first bad image, ``skip`` drops and counts its questions; an image
            that stops decoding after the scan raises ``DataError`` from ``__getitem__`` (``raise``) or gives a
            ``None`` sample that the collate drops (``skip``).
        scan: how much of each image the set-up scan reads (each distinct image once).

    Samples: ``{"image": (3, H, W) tensor, "question": str, "answer": str, "answer_index": int,
    "is_closed": bool, "qid": str, "image_id": str}``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Any], torch.Tensor],
        answer_vocab: AnswerVocab,
        *,
        name: str = "vqa",
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        progress: bool = True,
    ) -> None:
        self.records, report = scan_images(
            records, name=name, mode=scan, on_error=on_error, id_key="qid", progress=progress
        )
        self.reports: list[ScanReport] = [report]
        self.transform = transform
        self.answer_vocab = answer_vocab
        self.on_error: OnError = on_error
        self.skips = RuntimeSkips()
        """Samples dropped after the scan because their image stopped decoding (``on_error="skip"``)."""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_out_of_vocabulary(self) -> int:
        """Questions whose answer is not in the vocabulary (always scored wrong)."""
        return sum(self.answer_vocab.index(record["answer"]) is None for record in self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = load_scanned_image(record["image"], on_error=self.on_error, record=record["qid"], skips=self.skips)
        if image is None:
            return None
        answer_index = self.answer_vocab.index(record["answer"])
        return {
            "image": self.transform(image),
            "question": record["question"],
            "answer": record["answer"],
            "answer_index": -1 if answer_index is None else answer_index,
            "is_closed": record["answer_type"] == "closed",
            "qid": record["qid"],
            "image_id": record["image_id"],
        }


class VQACollator:
    """Batch VQA samples: tokenise the questions, build one-hot answer targets.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: question length in tokens (longer questions are truncated).
        num_answers: size ``A`` of the answer vocabulary.

    Returns (from ``__call__``): ``pixel_values (B, 3, H, W)``, ``input_ids (B, L)``, ``attention_mask (B,
    L)``, ``targets (B, A)`` float one-hot (an all-zero row for an answer outside the vocabulary),
    ``answer_index (B,)`` long (-1 outside), ``is_closed (B,)`` bool, ``qids``, ``questions``, ``answers``
    (lists of str). ``None`` samples are dropped; a batch of nothing but ``None`` samples gives ``None`` (the
    training step skips it).
    """

    def __init__(self, tokenizer: Any, max_length: int = 32, *, num_answers: int) -> None:
        if num_answers < 1:
            raise ValueError(f"num_answers must be positive, got {num_answers}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_answers = num_answers

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        if not samples:
            raise ValueError("VQACollator got an empty batch")
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return None
        questions = [sample["question"] for sample in samples]
        tokens = self.tokenizer(
            questions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        answer_index = torch.tensor([sample["answer_index"] for sample in samples], dtype=torch.long)
        if int(answer_index.max()) >= self.num_answers:
            raise ValueError(f"answer index {int(answer_index.max())} >= num_answers {self.num_answers}")
        targets = torch.zeros(len(samples), self.num_answers)
        inside = answer_index >= 0
        targets[inside.nonzero().squeeze(1), answer_index[inside]] = 1.0
        return {
            "pixel_values": torch.stack([sample["image"] for sample in samples]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "targets": targets,
            "answer_index": answer_index,
            "is_closed": torch.tensor([sample["is_closed"] for sample in samples], dtype=torch.bool),
            "qids": [sample["qid"] for sample in samples],
            "questions": questions,
            "answers": [sample["answer"] for sample in samples],
        }
