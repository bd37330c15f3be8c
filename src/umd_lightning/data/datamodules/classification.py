"""The image-text classification DataModule: label column, class names, classification or calib batches."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from umd_lightning.data.classification import (
    DEFAULT_LABEL_COLUMN,
    ClassificationCollator,
    ClassificationDataset,
    class_names_from,
)
from umd_lightning.data.common import SPLITS, Split
from umd_lightning.data.datamodules.downstream import DownstreamDataModule
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanReport
from umd_lightning.data.sources.medmnist import medmnist_records
from umd_lightning.data.sources.medpix import medpix_records
from umd_lightning.data.sources.melinda import melinda_records


class ClassificationDataModule(DownstreamDataModule):
    """Image-text classification: batches of ``ClassificationCollator`` (``task``) or ``PretrainCollator`` on
    (image, caption) (``calib``). ``class_names`` and ``num_classes`` are known after ``__init__``.

    Args:
        dataset: ``melinda``, ``medpix`` (MedPix 2.0) or ``medmnist`` (image only, a fixed text prompt).
        root: the data set's folder; for MedMNIST the ``.npz`` file.
        label_column: the label; ``None`` picks the default: MELINDA ``p_meth_label`` (or ``i_meth``,
            ``p_meth``, ``i_meth_label``), MedPix ``Location Category`` (or ``Type``); MedMNIST has none.
        prompt: MedMNIST's fixed text (``None``: chosen from the file name, e.g. ``a chest x-ray``).
        max_text_length: captions are truncated to this many tokens (reference: 128 for MELINDA).
        batch_size: samples per batch (per process).
        **kwargs: the shared options (tokenizer, image_size, num_workers, mode, mask_ratio_text, on_error, scan,
            seed, split_seed), see :class:`DownstreamDataModule`.

    Raises:
        ValueError: unknown label column (the valid ones are listed), a label column for MedMNIST, or a val or
            test label not seen in training (named).
    """

    task = "classification"

    def __init__(
        self,
        dataset: Literal["melinda", "medpix", "medmnist"],
        root: str,
        label_column: str | None = None,
        prompt: str | None = None,
        max_text_length: int = 128,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, max_text_length=max_text_length, batch_size=batch_size, **kwargs)
        self.name = dataset
        self.dataset = dataset
        self.label_column = label_column if label_column is not None else DEFAULT_LABEL_COLUMN.get(dataset)
        self.prompt = prompt
        reports: list[ScanReport] = []
        if dataset == "melinda":
            records = melinda_records(root, label_column=self.label_column, on_error=self.on_error, reports=reports)
        elif dataset == "medpix":
            records = medpix_records(root, label_column=self.label_column, on_error=self.on_error, reports=reports)
        elif dataset == "medmnist":
            if label_column is not None:
                raise ValueError(f"medmnist has a single label; label_column must be None, got {label_column!r}")
            records = medmnist_records(root, prompt=prompt)
        else:
            raise ValueError(f"unknown classification data set {dataset!r}: choose melinda, medpix or medmnist")
        self.scan_reports += reports
        self.records = {split: [r for r in records if r.split == split] for split in SPLITS}
        self.class_names = class_names_from(records)
        known = set(self.class_names)
        for split in ("val", "test"):
            unseen = sorted({r.label_name for r in self.records[split]} - known)
            if unseen:
                raise ValueError(
                    f"{dataset} {split} split: label(s) {unseen} of column {self.label_column!r} were not "
                    f"seen in training; training classes are {self.class_names}"
                )
        for split, recs in self.records.items():
            counts = Counter(r.label_name for r in recs)
            rank_zero_info(f"{dataset}/{split}: {len(recs)} samples, classes {dict(sorted(counts.items()))}")

    @property
    def num_classes(self) -> int:
        """Number of classes, the classification head's output width."""
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    @property
    def labels(self) -> list[str]:
        return list(self.class_names)

    def _pair(self, record: Record) -> Record:
        return record

    def _build(self, split: Split) -> Dataset:
        if self.mode == "calib" and self.dataset == "medmnist":
            raise ValueError("medmnist has no captions (a fixed prompt): TD-Calib needs image-text pairs")
        return super()._build(split)

    def _task_dataset(self, split: Split, train: bool) -> Dataset:
        return ClassificationDataset(
            self.records[split],
            self.transform(train),
            self.class_names,
            name=f"{self.name}/{split}",
            on_error=self.on_error,
            scan=self.scan,
        )

    def _task_collator(self, split: Split) -> ClassificationCollator:
        return ClassificationCollator(self.text_tokenizer, self.max_text_length)
