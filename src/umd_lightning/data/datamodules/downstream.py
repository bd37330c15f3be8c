"""DataModules of the downstream tasks: VQA, classification and retrieval (UMD_SPEC 3, 4.1, 5).

Each reads its annotation files in ``__init__`` (cheap, no image is opened), so what only the data knows
(answer vocabulary, class names) exists before the model is built and the CLI can link it into the model;
images are scanned in ``setup()``. ``mode="calib"`` turns every split into (image, text) pairs batched by
``PretrainCollator`` for TD-Calib (text: the question for VQA, the caption otherwise; no labels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from umd_lightning.data.common import SPLITS, OnError, Split
from umd_lightning.data.datamodule_base import ImageTextDataModule
from umd_lightning.data.datasets import ImageTextPairs
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanMode, ScanReport, require_samples
from umd_lightning.data.transforms import image_transform
from umd_lightning.errors import ConfigError

Mode = Literal["task", "calib"]


STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


class DownstreamDataModule(ImageTextDataModule):
    """What the downstream DataModules share: tokenizer, transforms, the calib mode, loaders, scan reports.

    A subclass fills ``self.records`` (split -> records) in its ``__init__`` and implements
    :meth:`_task_dataset`, :meth:`_task_collator` and :meth:`_pair`.

    Args:
        root: the data set's folder (MedMNIST: its ``.npz`` file).
        tokenizer: tokenizer name or local folder (``minilm`` is the packaged all-MiniLM-L6-v2); must match
            the model's text tower. Read with ``local_files_only`` when it is a folder.
        image_size: side of the square images given to the model.
        max_text_length: texts are truncated to this many tokens.
        batch_size: samples per batch (per process).
        num_workers: DataLoader worker processes; 0 loads in the main process.
        mode: ``task`` for fine-tuning batches, ``calib`` for TD-Calib reconstruction batches.
        mask_ratio_text: fraction of each text's tokens masked, whole words at a time (``calib`` only).
        on_error: ``raise`` stops at the first bad record at set-up; ``skip`` drops and counts bad records.
        scan: how deeply images are checked at set-up: ``full`` decodes, ``header`` opens, ``none`` skips.
        seed: seed of the run's data randomness (order, augmentation, text masks, retrieval negatives);
            ``None`` takes the run's ``seed_everything``, so one seed drives every draw.
        split_seed: seed of the data set's partition (held-out validation images, the evaluation pairs picked):
            fixed by default, so runs with different seeds are scored on the same splits.
    """

    name = "downstream"
    task = "downstream"
    """The fine-tuning task (``vqa``, ``classification``, ``retrieval``), linked into the model by the CLI."""

    def __init__(
        self,
        root: str,
        tokenizer: str = "minilm",
        image_size: int = 384,
        max_text_length: int = 32,
        batch_size: int = 64,
        num_workers: int = 2,
        mode: Mode = "task",
        mask_ratio_text: float = 0.15,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        seed: int | None = None,
        split_seed: int = 0,
    ) -> None:
        if mode not in ("task", "calib"):
            raise ConfigError(f"data.init_args.mode must be 'task' or 'calib', got {mode!r}")
        super().__init__(tokenizer, image_size, max_text_length, mask_ratio_text, batch_size, num_workers, seed)
        self.root = root
        self.mode: Mode = mode
        self.on_error: OnError = on_error
        self.scan: ScanMode = scan
        self.split_seed = split_seed
        self.records: dict[Split, list[Record]] = {}
        self.datasets: dict[Split, Dataset] = {}
        self.scan_reports: list[ScanReport] = []
        self.leaky = False
        self.leak_notes: list[str] = []

    def transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> ``(3, image_size, image_size)`` tensor (training or evaluation transform)."""
        return image_transform(self.image_size, train=train)

    @property
    def num_outputs(self) -> int | None:
        """Width of the task head's output (answers or classes); ``None`` for retrieval."""
        return None

    @property
    def labels(self) -> list[str] | None:
        """Names of the task head's outputs, in order (answers or classes); ``None`` for retrieval."""
        return None

    def _leak(self, note: str) -> None:
        self.leaky = True
        self.leak_notes.append(note)

    def _pair(self, record: Record) -> Record:
        """The (image, text) pair of a record for ``calib`` mode: a ``Record`` with ``image``, ``id`` and one text."""
        raise NotImplementedError

    def _task_dataset(self, split: Split, train: bool) -> Dataset:
        raise NotImplementedError

    def _task_collator(self, split: Split) -> Callable[[list[Any]], dict[str, Any]]:
        raise NotImplementedError

    def _build(self, split: Split) -> Dataset:
        train = split == "train"
        if self.mode == "calib":
            return ImageTextPairs(
                [self._pair(record) for record in self.records[split]],
                self.transform(train),
                name=f"{self.name}/{split}/calib",
                on_error=self.on_error,
                scan=self.scan,
            )
        return self._task_dataset(split, train)

    def setup(self, stage: str) -> None:
        """Build (and scan the images of) the splits a stage needs: train and val for ``fit``, val for
        ``validate``, test for ``test`` and ``predict``; print the scan reports."""
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split in self.datasets:
                continue
            dataset = self._build(split)
            self.datasets[split] = dataset
            for report in getattr(dataset, "reports", []):
                self.scan_reports.append(report)
                rank_zero_info(report.summary())
            if split == "train" and stage == "fit":
                # Training on nothing would end "successfully" with no checkpoint: stop with the scan's counts.
                require_samples(len(dataset), getattr(dataset, "reports", []), where=self.root, split=split)

    def _collator(self, split: Split) -> Callable[[list[Any]], Any]:
        if self.mode == "calib":
            return self._pair_collator(split == "train")
        return self._task_collator(split)

    def _loader(self, split: Split, dataset: Dataset | None = None) -> DataLoader:
        if dataset is None:
            if split not in self.datasets:
                raise RuntimeError(f"the {split} split is not built: call setup() with the matching stage first")
            dataset = self.datasets[split]
        return self._make_loader(dataset, split == "train", self._collator(split))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, for prediction."""
        return self._loader("test")
