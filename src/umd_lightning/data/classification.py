"""Image-text classification: the class names, the dataset and the collate over the records of the MELINDA, MedPix
and MedMNIST readers (``data/sources/``; DATA.md, "Downstream classification").

Each ``*_records`` function returns ``records.Record``s with ``id``, ``image`` (a path, or MedMNIST's array), the
caption (``text``), ``label_name`` and ``split``; class ids come from the sorted label names of the training split
(:func:`class_names_from`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from umd_lightning.data.common import OnError, to_rgb
from umd_lightning.data.datasets import ScannedRecords
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanMode

ClassificationDatasetName = Literal["melinda", "medpix", "medmnist"]
DEFAULT_LABEL_COLUMN = {"melinda": "p_meth_label", "medpix": "Location Category", "medmnist": None}


log = logging.getLogger(__name__)


def class_names_from(records: Sequence[Record]) -> list[str]:
    """Class names = the sorted distinct labels of the training records (numeric labels sorted as numbers).

    Raises:
        ValueError: there are no training records.
    """
    names = {record.label_name for record in records if record.split == "train"}
    if not names:
        raise ValueError("no training records to take the class names from")
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


class ClassificationDataset(ScannedRecords):
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
        unseen = sorted({r.label_name for r in records if r.label_name not in index})
        if unseen:
            splits = sorted({r.split for r in records if r.label_name in unseen})
            raise ValueError(
                f"{name}: label(s) {unseen} in split(s) {splits} were not seen in training; "
                f"known classes are {self.class_names}"
            )
        super().__init__(records, transform, name=name, on_error=on_error, scan=scan, progress=progress)
        self.labels = [index[record.label_name] for record in self.records]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = record.image
        if isinstance(image, np.ndarray):
            picture = to_rgb(Image.fromarray(image))
        else:
            picture = self._load_image(record)
            if picture is None:
                return None
        return {
            "image": self.transform(picture),
            "text": record.text,
            "label": self.labels[index],
            "id": record.id,
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
