"""The retrieval DataModule: candidate captions for training, evaluation splits with their tokenised captions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset

from umd_lightning.data.common import SPLITS, Split
from umd_lightning.data.datamodules.downstream import DownstreamDataModule
from umd_lightning.data.datasets import ImageTextPairs
from umd_lightning.data.records import Record
from umd_lightning.data.retrieval import (
    RetrievalEvalSplit,
    RetrievalTrainCollator,
    collate_images,
    make_eval_split,
    read_retrieval_records,
)
from umd_lightning.data.scan import ScanReport
from umd_lightning.errors import ConfigError
from umd_lightning.seeds import run_seed


class RetrievalDataModule(DownstreamDataModule):
    """Image-text retrieval. Training batches come from ``RetrievalTrainCollator`` (each image with its
    caption first and ``num_candidates - 1`` other captions). Evaluation loaders (``task`` mode) yield only
    images, ``{"pixel_values", "image_index"}``; the module takes the captions from :meth:`eval_split`, which
    scores val and test separately. In ``calib`` mode every split gives (image, caption) pairs.

    Args:
        dataset: ``roco`` (radiology subset) or ``medpix`` (MedPix 2.0 captions).
        root: the data set's folder.
        max_text_length: captions are truncated to this many tokens (reference: 40).
        batch_size: images per batch (per process).
        num_candidates: captions scored per training image, the true one included (reference: 16).
        max_eval_pairs: image-caption pairs kept per evaluation split, picked by a seeded shuffle (reference:
            2,000); ``None`` keeps all.
        **kwargs: the shared options (tokenizer, image_size, num_workers, mode, mask_ratio_text, on_error, scan,
            seed, split_seed), see :class:`DownstreamDataModule`.
    """

    task = "retrieval"

    def __init__(
        self,
        dataset: Literal["roco", "medpix"],
        root: str,
        max_text_length: int = 40,
        batch_size: int = 128,
        num_candidates: int = 16,
        max_eval_pairs: int | None = 2000,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, max_text_length=max_text_length, batch_size=batch_size, **kwargs)
        self.name = dataset
        self.dataset = dataset
        self.num_candidates = num_candidates
        self.max_eval_pairs = max_eval_pairs
        reports: list[ScanReport] = []
        records = read_retrieval_records(dataset, root, on_error=self.on_error, reports=reports)
        self.scan_reports += reports
        self.records = {split: [r for r in records if r.split == split] for split in SPLITS}
        distinct = len({r.text for r in self.records["train"]})
        if self.mode == "task" and (num_candidates < 2 or distinct < num_candidates):
            raise ConfigError(
                f"data.init_args.num_candidates={num_candidates} needs at least 2 and at most the {distinct} distinct "
                f"training captions of {dataset} at {root}"
            )
        self.eval_splits: dict[Split, RetrievalEvalSplit] = {}
        for split, recs in self.records.items():
            rank_zero_info(f"{dataset}/{split}: {len(recs)} pairs, {len({r.text for r in recs})} distinct captions")

    def _pair(self, record: Record) -> Record:
        return record

    def _task_dataset(self, split: Split, train: bool) -> Dataset:
        if train:
            return ImageTextPairs(
                self.records[split],
                self.transform(True),
                name=f"{self.name}/train",
                on_error=self.on_error,
                scan=self.scan,
            )
        evaluation = make_eval_split(
            self.records[split],
            self.transform(False),
            max_pairs=self.max_eval_pairs,
            seed=self.split_seed,
            name=f"{self.name}/{split}",
            on_error=self.on_error,
            scan=self.scan,
        )
        self.eval_splits[split] = evaluation
        return evaluation.images

    def _task_collator(self, split: Split) -> Callable[[list[Any]], dict[str, Any]]:
        if split == "train":
            return RetrievalTrainCollator(
                self.text_tokenizer,
                [r.text for r in self.records["train"]],
                max_length=self.max_text_length,
                num_candidates=self.num_candidates,
                seed=run_seed(self.seed),
            )
        return collate_images

    def eval_captions(self, stage: str) -> tuple[RetrievalEvalSplit, torch.Tensor, torch.Tensor]:
        """What a model needs to score a stage's retrieval split: the split (:meth:`eval_split`) and its captions
        tokenised as the training texts are, ``(input_ids, attention_mask)``, both ``(T, L)``.

        Raises:
            RuntimeError: see :meth:`eval_split`.
        """
        split = self.eval_split(stage)
        encoded = self.text_tokenizer(
            list(split.captions), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return split, encoded["input_ids"], encoded["attention_mask"]

    def eval_image_loader(self, stage: str, shard: tuple[int, int] = (0, 1)) -> DataLoader:
        """The images of a stage's evaluation split once more, for a pass before the stage's own batches (the ITC
        ranking of ``retrieval_eval: topk``): every ``shard[1]``-th image from ``shard[0]`` (one process's share),
        batches as the evaluation loader's (``{"pixel_values", "image_index"}``).

        Raises:
            RuntimeError: see :meth:`eval_split`.
        """
        images = self.eval_split(stage).images
        rank, world = shard
        return DataLoader(
            Subset(images, range(rank, len(images), world)),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_images,
        )

    def eval_split(self, stage: str) -> RetrievalEvalSplit:
        """The evaluation split of a stage (``fit``/``validate``/``val`` -> val, ``test`` -> test), with its
        caption list; ``setup()`` must have built it.

        Raises:
            RuntimeError: not built yet, or ``calib`` mode (no retrieval evaluation).
        """
        split: Split = "test" if stage in ("test", "predict") else "val"
        if split not in self.eval_splits:
            raise RuntimeError(f"no {split} retrieval split: call setup() for the stage first (and use mode='task')")
        return self.eval_splits[split]
