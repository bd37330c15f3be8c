"""Image-text classification data sets (DATA.md, "Downstream classification"), the dataset and collate.

Each ``*_records`` function returns plain dict records ``{"id": str, "image": Path | numpy array, "text": str,
"label_name": str, "split": "train" | "val" | "test"}``; class ids come from the sorted label names of the
training split (:func:`class_names_from`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from umd_lightning.data.common import (
    DataError,
    OnError,
    RuntimeSkips,
    ScanMode,
    ScanReport,
    add_report,
    check_label_column,
    check_text,
    load_scanned_image,
    safe_join,
    scan,
    scan_images,
    to_rgb,
)
from umd_lightning.data.files import read_csv_rows, require_files

ClassificationDatasetName = Literal["melinda", "medpix", "medmnist"]
MELINDA_LABEL_COLUMNS = ("i_meth", "p_meth", "i_meth_label", "p_meth_label")
DEFAULT_LABEL_COLUMN = {"melinda": "p_meth_label", "medpix": "Location Category", "medmnist": None}

Record = dict[str, Any]

log = logging.getLogger(__name__)


def melinda_records(
    root: str | Path,
    *,
    label_column: str = "p_meth_label",
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
) -> list[Record]:
    """MELINDA: ``train.csv``, ``dev.csv``, ``test.csv`` (``figure_file``, ``caption`` and the label columns)
    with images in ``melinda_images/``.

    Args:
        label_column: one of ``i_meth``, ``p_meth``, ``i_meth_label``, ``p_meth_label`` (default, 7 classes).

    Raises:
        ValueError: unknown label column (named).
        DataError: a CSV without a required column (named; kind ``missing_column``), whatever ``on_error``.
        FileNotFoundError: a split file is missing.
    """
    check_label_column("melinda", label_column, MELINDA_LABEL_COLUMNS)
    root = Path(root)
    files = {"train": "train.csv", "val": "dev.csv", "test": "test.csv"}
    require_files(root, files.values(), "melinda")
    records: list[Record] = []
    for split, name in files.items():
        file = root / name
        _, rows = read_csv_rows(file, ("figure_file", "caption", label_column))

        def parse(item: tuple[int, dict[str, str]], file: Path = file, split: str = split) -> Record:
            number, row = item
            figure = row.get("figure_file")
            record_id = figure or f"line {number}"
            return {
                "id": record_id,
                "image": safe_join(root / "melinda_images", figure, file=file, record=record_id),
                "text": check_text(row.get("caption"), file=file, record=record_id, what="caption"),
                "label_name": check_text(row.get(label_column), file=file, record=record_id, what=label_column),
                "split": split,
            }

        numbered = list(enumerate(rows, start=2))  # line 1 is the header
        kept, report = scan(numbered, parse, name=f"melinda/{split}", on_error=on_error, progress=False)
        add_report(reports, report)
        records += kept
    return records


MEDMNIST_PROMPTS = {"pneumoniamnist": "a chest x-ray", "breastmnist": "a breast ultrasound image"}


def medmnist_prompt(path: str | Path) -> str:
    """The fixed text input for a MedMNIST file, chosen by its name (``a medical image`` when unknown)."""
    return MEDMNIST_PROMPTS.get(Path(path).stem.lower(), "a medical image")


def medmnist_records(path: str | Path, *, prompt: str | None = None) -> list[Record]:
    """A MedMNIST ``.npz`` file (``{train,val,test}_images`` N x H x W (x 1 or 3) uint8, ``*_labels``), image only.

    Args:
        path: the ``.npz`` file.
        prompt: the fixed text paired with every image; ``None`` picks one from the file name
            (:func:`medmnist_prompt`).

    Raises:
        FileNotFoundError: no such file.
        DataError: (a ``ValueError``) the file is not a readable ``.npz`` archive, an array is missing (named) or
            has the wrong type or shape, or the labels are multi-label (not supported); the file is named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"medmnist: {path} is not a file; expected a MedMNIST .npz such as pneumoniamnist.npz")
    text = prompt if prompt is not None else medmnist_prompt(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy and zipfile raise many kinds (ValueError, OSError, BadZipFile, EOFError)
        raise DataError("bad_annotation", path, None, f"not a readable .npz archive: {str(exc)[:200]}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError("bad_annotation", path, None, "holds a single array, expected a MedMNIST .npz archive")
    records: list[Record] = []
    with archive as arrays:
        for split in ("train", "val", "test"):
            missing = [key for key in (f"{split}_images", f"{split}_labels") if key not in arrays.files]
            if missing:
                raise DataError("missing_array", path, None, f"missing array(s) {missing}; the file has {arrays.files}")
            try:
                images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            except Exception as exc:  # a member cut short or refused (object arrays need pickle)
                raise DataError("bad_annotation", path, split, f"cannot read its arrays: {str(exc)[:200]}") from exc
            channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
            channels_ok = channels_ok and min(images.shape[1:3]) > 0
            if images.dtype != np.uint8 or not channels_ok:
                raise DataError(
                    "bad_annotation",
                    path,
                    split,
                    f"{split}_images is {images.dtype} {images.shape}, expected uint8 N x H x W (x 1 or 3)",
                )
            if not np.issubdtype(labels.dtype, np.integer) or labels.ndim == 0 or len(labels) != len(images):
                raise DataError(
                    "bad_annotation",
                    path,
                    split,
                    f"{split}_labels is {labels.dtype} {labels.shape}, expected {len(images)} integer labels",
                )
            labels = labels.reshape(len(labels), -1)
            if labels.shape[1] != 1:
                raise DataError(
                    "bad_annotation",
                    path,
                    split,
                    f"{split}_labels has {labels.shape[1]} columns; multi-label is not supported",
                )
            if images.ndim == 4 and images.shape[-1] == 1:
                images = images[..., 0]
            records += [
                {
                    "id": f"{split}/{i}",
                    "image": images[i],
                    "text": text,
                    "label_name": str(int(labels[i, 0])),
                    "split": split,
                }
                for i in range(len(images))
            ]
    return records


def class_names_from(records: Sequence[Record]) -> list[str]:
    """Class names = the sorted distinct labels of the training records (numeric labels sorted as numbers).

    Raises:
        ValueError: there are no training records.
    """
    names = {record["label_name"] for record in records if record["split"] == "train"}
    if not names:
        raise ValueError("no training records to take the class names from")
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


class ClassificationDataset(Dataset):
    """(image, text) -> class samples from records; image files are scanned at construction.

    Args:
        records: records from a ``*_records`` function.
        transform: PIL RGB image -> ``(3, H, W)`` tensor.
        class_names: the label space (class id = position), from the training split.
        name: name in the scan report.
        on_error: ``raise`` fails on the first bad image, ``skip`` drops and counts it; an image that stops
            decoding after the scan raises ``DataError`` from ``__getitem__`` (``raise``) or gives a ``None``
            sample that the collate drops (``skip``).
        scan: how much of each image file the set-up scan reads.

    Samples: ``{"image": (3, H, W) tensor, "text": str, "label": int, "id": str}``.

    Raises:
        ValueError: a record's label is not among ``class_names`` (named with its split).
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], torch.Tensor],
        class_names: Sequence[str],
        *,
        name: str = "classification",
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        progress: bool = True,
    ) -> None:
        self.class_names = list(class_names)
        index = {label: i for i, label in enumerate(self.class_names)}
        unseen = sorted({r["label_name"] for r in records if r["label_name"] not in index})
        if unseen:
            splits = sorted({r["split"] for r in records if r["label_name"] in unseen})
            raise ValueError(
                f"{name}: label(s) {unseen} in split(s) {splits} were not seen in training; "
                f"known classes are {self.class_names}"
            )
        self.records, report = scan_images(records, name=name, mode=scan, on_error=on_error, progress=progress)
        self.reports: list[ScanReport] = [report]
        self.labels = [index[record["label_name"]] for record in self.records]
        self.transform = transform
        self.on_error: OnError = on_error
        self.skips = RuntimeSkips()
        """Samples dropped after the scan because their image stopped decoding (``on_error="skip"``)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = record["image"]
        if isinstance(image, np.ndarray):
            picture = to_rgb(Image.fromarray(image))
        else:
            picture = load_scanned_image(image, on_error=self.on_error, record=record["id"], skips=self.skips)
            if picture is None:
                return None
        return {
            "image": self.transform(picture),
            "text": record["text"],
            "label": self.labels[index],
            "id": record["id"],
        }


class ClassificationCollator:
    """Batch classification samples.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: text length in tokens (longer texts are truncated).

    Returns (from ``__call__``): ``pixel_values (B, 3, H, W)``, ``input_ids (B, L)``, ``attention_mask (B,
    L)``, ``labels (B,)`` long, ``ids`` (list of str). ``None`` samples are dropped; a batch of nothing but
    ``None`` samples gives ``None`` (the training step skips it).
    """

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        if not samples:
            raise ValueError("ClassificationCollator got an empty batch")
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return None
        tokens = self.tokenizer(
            [sample["text"] for sample in samples],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": torch.stack([sample["image"] for sample in samples]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "labels": torch.tensor([sample["label"] for sample in samples], dtype=torch.long),
            "ids": [sample["id"] for sample in samples],
        }
