"""The pre-training DataModules: which sources (or which pack), which splits, how many workers; nothing else
(STYLE.md 8). ``PretrainDataModule`` reads the publishers' files, ``PackedPretrainDataModule`` a pack that
``umd data pack`` wrote from them; both give the same batches (same collate, masks, order and resume)."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from umd_lightning.data.common import OnError
from umd_lightning.data.datamodule_base import ImageTextDataModule
from umd_lightning.data.packed import Manifest, PackedPairs, open_pack
from umd_lightning.data.pretrain import PretrainConcatDataset, SourceSpec, build_pretrain_datasets
from umd_lightning.data.scan import ScanMode, ScanReport, require_samples
from umd_lightning.data.transforms import image_transform
from umd_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class _PairsDataModule(ImageTextDataModule):
    """What both pre-training DataModules share: the set-up of the splits and the loaders of their pairs. A
    subclass says how a split is built (``_build``) and where its data is (``_where``).
    """

    val_split = "val"
    train_dataset: Dataset | None = None
    val_dataset: Dataset | None = None
    test_dataset: Dataset | None = None

    def _build(self, split: str, train: bool) -> Dataset:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    @staticmethod
    def _reports(dataset: Dataset) -> list[ScanReport]:
        return list(getattr(dataset, "reports", []))

    def setup(self, stage: str) -> None:
        """Build the splits a stage needs and print their scan reports.

        ``fit``: train and validation; ``validate``: validation; ``test`` and ``predict``: test.
        """
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self._build("train", train=True)
            # Training on nothing would end "successfully" with no checkpoint: stop with the scan's counts.
            count = len(self.train_dataset)  # type: ignore[arg-type]
            require_samples(count, self._reports(self.train_dataset), where=self._where(), split="train")
            if count < self.batch_size:
                raise ConfigError(
                    f"the train split has {count} pairs, fewer than data.init_args.batch_size="
                    f"{self.batch_size}: with drop_last no batch would be produced; lower the batch size"
                )
        if stage in ("fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build(self.val_split, train=False)
        if stage in ("test", "predict") and self.test_dataset is None:
            self.test_dataset = self._build("test", train=False)

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"the {split} split is not built: call setup() with the matching stage first")
        return self._make_loader(dataset, train, self._pair_collator(train), drop_last=train)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches, the last incomplete one dropped (every step sees ``batch_size`` pairs)."""
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.val_split, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", train=False)


class PretrainDataModule(_PairsDataModule):
    """Image-text pairs from one or more sources, tokenised and whole-word masked (MR-Pretrain, TD-Calib).

    Batches are the dicts of ``PretrainCollator`` (``pixel_values``, ``input_ids``, ``attention_mask``,
    ``mlm_input_ids``, ``mlm_labels``, ``ids``, ``texts``). Validation and test batches get the same masks
    every epoch (``fixed_masks``), so their reconstruction losses can be compared across epochs.

    Args:
        sources: the data sets, each ``{format, root, options}`` (see ``SourceSpec``); their splits are
            concatenated.
        tokenizer: tokenizer name or local folder (``minilm`` is the packaged all-MiniLM-L6-v2); must match
            the model's text tower. A folder is read with ``local_files_only``.
        image_size: side of the square images given to the model.
        max_text_length: texts are truncated to this many tokens.
        mask_ratio_text: fraction of each text's tokens to mask, whole words at a time.
        batch_size: samples per batch (per process).
        num_workers: DataLoader worker processes; 0 loads in the main process.
        on_error: ``raise`` stops at the first bad record at set-up; ``skip`` drops and counts bad records.
        scan: how deeply images are checked at set-up: ``full`` decodes, ``header`` opens, ``none`` skips.
        val_split: the validation split (each format maps ``val`` to its own name, e.g. MedPix ``dev``).
        seed: seed of the data order, the augmentation and the text masks (and, through the loader's per-step
            seeding, of the patch masks and ITM negatives); ``None`` takes the run's ``seed_everything``.
    """

    def __init__(
        self,
        sources: list[SourceSpec],
        tokenizer: str = "minilm",
        image_size: int = 288,
        max_text_length: int = 64,
        mask_ratio_text: float = 0.15,
        batch_size: int = 32,
        num_workers: int = 2,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        val_split: str = "val",
        seed: int | None = None,
    ) -> None:
        if not sources:
            raise ConfigError("PretrainDataModule needs at least one source (data.init_args.sources)")
        super().__init__(tokenizer, image_size, max_text_length, mask_ratio_text, batch_size, num_workers, seed)
        self.sources = [SourceSpec(**source) if isinstance(source, dict) else source for source in sources]
        self.on_error: OnError = on_error
        self.scan: ScanMode = scan
        self.val_split = val_split

    def _where(self) -> str:
        return ", ".join(source.root for source in self.sources)

    def _build(self, split: str, train: bool) -> PretrainConcatDataset:
        dataset = build_pretrain_datasets(
            self.sources,
            split,
            image_transform(self.image_size, train=train),
            on_error=self.on_error,
            scan=self.scan,
        )
        for report in dataset.reports:
            rank_zero_info(report.summary())
        rank_zero_info(f"{split}: {len(dataset)} image-text pairs from {len(dataset.reports)} source(s)")
        return dataset


class PackedPretrainDataModule(_PairsDataModule):
    """The pairs of a pack written by ``umd data pack`` (pre-resized images in litdata shards), batched exactly as
    ``PretrainDataModule`` batches the sources it was packed from.

    Same records, texts, order, collate and text masks, split across DDP ranks by the same sampler (disjoint
    shards of each epoch's permutation), resumed mid-epoch from a checkpoint the same way; a lossless pack
    (``png`` / ``raw``) gives the raw path's batches bit for bit. Only the image decoding and resizing are gone.
    The pack holds texts, not tokens, so any tokenizer can read it.

    Args:
        pack: the folder ``umd data pack --out`` wrote (its ``manifest.json`` and ``train`` / ``val`` / ``test``
            shards); checked when the DataModule is built.
        tokenizer: tokenizer name or local folder, as for ``PretrainDataModule``.
        image_size: side of the square images given to the model: must be the pack's (re-pack for another).
        max_text_length: texts are truncated to this many tokens.
        mask_ratio_text: fraction of each text's tokens to mask, whole words at a time.
        batch_size: samples per batch (per process).
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: seed of the data order, the augmentation and the text masks; ``None`` takes the run's
            ``seed_everything``.
    """

    def __init__(
        self,
        pack: str,
        tokenizer: str = "minilm",
        image_size: int = 288,
        max_text_length: int = 64,
        mask_ratio_text: float = 0.15,
        batch_size: int = 32,
        num_workers: int = 2,
        seed: int | None = None,
    ) -> None:
        super().__init__(tokenizer, image_size, max_text_length, mask_ratio_text, batch_size, num_workers, seed)
        self.pack = pack
        self.manifest: Manifest = open_pack(pack)
        if self.manifest.image_size != image_size:
            raise ConfigError(
                f"the pack {pack} holds {self.manifest.image_size} px images but data.init_args.image_size is "
                f"{image_size} (the model's image size): set image_size {self.manifest.image_size}, or re-pack "
                f"with umd data pack ... --image_size {image_size}"
            )

    def _where(self) -> str:
        return self.pack

    def _build(self, split: str, train: bool) -> PackedPairs:
        dataset = PackedPairs(self.pack, split, image_transform(self.image_size, train=train), self.manifest)
        rank_zero_info(dataset.summary())
        return dataset
