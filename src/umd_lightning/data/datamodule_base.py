"""What every DataModule of the package shares, pre-training and downstream alike: the text and loader options
(checked once), the tokenizer, the (image, text) pair collate and the loaders. It imports no data task module, so
the downstream base can build on it (``tests/test_import_graph.py``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from umd_lightning.data.collate import PretrainCollator
from umd_lightning.data.sampler import check_loader_options, make_loader
from umd_lightning.models.text import load_tokenizer
from umd_lightning.seeds import run_seed


class ImageTextDataModule(LightningDataModule):
    """The options and pieces shared by the DataModules; a subclass documents the options in its own signature
    (they become its ``--help``) and hands them on here.

    Raises:
        ConfigError: an option out of its range (:func:`~umd_lightning.data.sampler.check_loader_options`).
    """

    def __init__(
        self,
        tokenizer: str,
        image_size: int,
        max_text_length: int,
        mask_ratio_text: float,
        batch_size: int,
        num_workers: int,
        seed: int | None,
    ) -> None:
        super().__init__()
        check_loader_options(batch_size, num_workers, max_text_length, mask_ratio_text, image_size)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_length = max_text_length
        self.mask_ratio_text = mask_ratio_text
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    @cached_property
    def text_tokenizer(self) -> PreTrainedTokenizerBase:
        """The loaded fast tokenizer named by ``tokenizer`` (:func:`~umd_lightning.models.text.load_tokenizer`)."""
        return load_tokenizer(self.tokenizer)

    def _pair_collator(self, train: bool) -> PretrainCollator:
        """The collate of (image, text) pairs: tokenised, whole-word masked; fixed masks outside training."""
        return PretrainCollator(
            self.text_tokenizer,
            max_length=self.max_text_length,
            mask_ratio_text=self.mask_ratio_text,
            seed=run_seed(self.seed),
            fixed_masks=not train,
        )

    def _make_loader(
        self, dataset: Dataset, train: bool, collate_fn: Callable[[list[Any]], Any], drop_last: bool = False
    ) -> DataLoader:
        """``dataset``'s loader (:func:`~umd_lightning.data.sampler.make_loader`) with this DataModule's options."""
        return make_loader(
            dataset,
            train=train,
            seed=run_seed(self.seed),
            batch_size=self.batch_size,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_fn,
        )
