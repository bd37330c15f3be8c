"""Image-text retrieval over the ROCO and MedPix 2.0 readers (``data/sources/``), training collate, evaluation
splits (UMD_SPEC 4.1).

Records are ``records.Record``s with ``id``, ``image`` (a path), the caption (``text``) and ``split``.
Training scores each image against its own caption and ``num_candidates - 1`` other captions; evaluation
scores every image against every caption of a split (at most ``max_pairs`` pairs, picked by a seeded shuffle).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from umd_lightning.data.common import OnError, load_image
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanMode, ScanReport, scan_images
from umd_lightning.data.sources.medpix import medpix_pairs
from umd_lightning.data.sources.roco import roco_records
from umd_lightning.errors import ConfigError

RetrievalDatasetName = Literal["roco", "medpix"]


log = logging.getLogger(__name__)


def read_retrieval_records(
    dataset: RetrievalDatasetName,
    root: str | Path,
    *,
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
) -> list[Record]:
    """Read a retrieval data set by name.

    Raises:
        ValueError: unknown name (the valid ones are listed).
    """
    if dataset == "roco":
        return roco_records(root, on_error=on_error, reports=reports)
    if dataset == "medpix":
        return medpix_pairs(root, on_error=on_error, reports=reports)
    raise ValueError(f"unknown retrieval data set {dataset!r}: choose one of ['roco', 'medpix']")


def select_eval_pairs(records: Sequence[Record], max_pairs: int | None, seed: int) -> list[Record]:
    """At most ``max_pairs`` records picked by a seeded shuffle, returned in their original order."""
    if max_pairs is None or len(records) <= max_pairs:
        return list(records)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:max_pairs])]


class RetrievalImages(Dataset):
    """The images of an evaluation split: samples ``{"image": (3, H, W) tensor, "image_index": int}``, where
    ``image_index`` is the row of the image (and of its caption) in the split's score matrix.

    Args:
        records: the split's scanned records.
        transform: PIL RGB image -> ``(3, H, W)`` tensor.
        reports: the scan reports of ``records``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], torch.Tensor],
        reports: Sequence[ScanReport] = (),
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.reports = list(reports)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        return {
            "image": self.transform(load_image(record.image, record=record.id)),
            "image_index": index,
        }


def collate_images(samples: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Batch :class:`RetrievalImages` samples: ``pixel_values (B, 3, H, W)``, ``image_index (B,)`` long."""
    samples = [sample for sample in samples if sample is not None]
    return {
        "pixel_values": torch.stack([sample["image"] for sample in samples]),
        "image_index": torch.tensor([sample["image_index"] for sample in samples], dtype=torch.long),
    }


@dataclass
class RetrievalEvalSplit:
    """One evaluation split: score every image against every caption.

    Attributes:
        images: the split's images (:class:`RetrievalImages`).
        captions: the caption candidates, one per pair, so caption ``j`` belongs to image ``j``.
        image_captions: the ground-truth caption text of each image. A retrieval is a hit when the retrieved
            caption's TEXT equals it (MedPix repeats captions within a case), in both directions.
        caption_ids: the record id of each caption's pair (for predictions).
    """

    images: RetrievalImages
    captions: list[str]
    image_captions: list[str]
    caption_ids: list[str]

    def tokenize_captions(self, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
        """All captions tokenised at once: ``input_ids`` and ``attention_mask``, each ``(T, L)``."""
        tokens = tokenizer(self.captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def make_eval_split(
    records: Sequence[Record],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    max_pairs: int | None = 2000,
    seed: int = 0,
    name: str = "retrieval/eval",
    on_error: OnError = "raise",
    scan: ScanMode = "full",
    progress: bool = True,
) -> RetrievalEvalSplit:
    """Pick at most ``max_pairs`` pairs by a seeded shuffle, then scan only their images (a split can hold far
    more pairs than are evaluated); with ``on_error="skip"`` bad pairs are dropped after the pick."""
    picked = select_eval_pairs(records, max_pairs, seed)
    chosen, report = scan_images(picked, name=name, mode=scan, on_error=on_error, progress=progress)
    captions = [record.text for record in chosen]
    ids = [record.id for record in chosen]
    return RetrievalEvalSplit(RetrievalImages(chosen, transform, [report]), captions, list(captions), ids)


class RetrievalTrainCollator:
    """Batch retrieval training samples with ``num_candidates`` captions per image, the true one first.

    The other captions are drawn from ``captions`` (the training split's) among those whose text differs from
    the image's own caption, so a repeated caption is never a negative for its own image.

    Args:
        tokenizer: a Hugging Face tokenizer.
        captions: the pool negatives are drawn from (needs at least ``num_candidates`` distinct texts).
        max_length: caption length in tokens.
        num_candidates: captions per image, the true one included (reference: 16).
        seed: seeds the draws in the main process. In a DataLoader worker the draws are seeded from the
            worker's torch seed instead (different per worker and per epoch, fixed by the run seed), so
            workers never repeat each other's negatives.

    Returns (from ``__call__``): ``pixel_values (B, 3, H, W)``, ``input_ids (B, K, L)``,
    ``attention_mask (B, K, L)`` with ``K = num_candidates``, ``ids`` (list of str). ``None`` samples are
    dropped; a batch of nothing but ``None`` samples gives ``None`` (the training step skips it).

    Raises:
        ValueError: fewer than ``num_candidates`` distinct captions in the pool.
    """

    def __init__(
        self,
        tokenizer: Any,
        captions: Sequence[str],
        max_length: int = 40,
        num_candidates: int = 16,
        seed: int | None = None,
    ) -> None:
        self.pool = sorted(set(captions))
        if num_candidates < 2 or len(self.pool) < num_candidates:
            raise ConfigError(
                f"retrieval training needs data.init_args.num_candidates >= 2 and at least that many distinct "
                "training captions; "
                f"got num_candidates={num_candidates} and {len(self.pool)} distinct captions"
            )
        self.position = {caption: i for i, caption in enumerate(self.pool)}
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_candidates = num_candidates
        self.seed = seed
        self._rng = random.Random(seed)
        self._worker_seed: int | None = None

    def _generator(self) -> random.Random:
        worker = get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            self._rng = random.Random(worker.seed)
        return self._rng

    def negatives(self, caption: str) -> list[str]:
        """``num_candidates - 1`` distinct captions of the pool, none equal to ``caption``."""
        rng = self._generator()
        own = self.position.get(caption)
        if own is None:
            return rng.sample(self.pool, self.num_candidates - 1)
        # Draw from the pool without the own caption: indices at or past it shift by one.
        picks = rng.sample(range(len(self.pool) - 1), self.num_candidates - 1)
        return [self.pool[i + 1 if i >= own else i] for i in picks]

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        if not samples:
            raise ValueError("RetrievalTrainCollator got an empty batch")
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return None
        texts = [text for sample in samples for text in [sample["text"], *self.negatives(sample["text"])]]
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        shape = (len(samples), self.num_candidates, -1)
        return {
            "pixel_values": torch.stack([sample["image"] for sample in samples]),
            "input_ids": tokens["input_ids"].view(shape),
            "attention_mask": tokens["attention_mask"].view(shape),
            "ids": [sample["id"] for sample in samples],
        }
