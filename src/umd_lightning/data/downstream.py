"""DataModules of the downstream tasks: VQA, classification and retrieval (UMD_SPEC 3, 4.1, 5).

Each reads its annotation files in ``__init__`` (cheap, no image is opened), so what only the data knows
(answer vocabulary, class names) exists before the model is built and the CLI can link it into the model;
images are scanned in ``setup()``. ``mode="calib"`` turns every split into (image, text) pairs batched by
``PretrainCollator`` for TD-Calib (text: the question for VQA, the caption otherwise; no labels).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import cached_property
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from umd_lightning.data.answers import AnswerVocab
from umd_lightning.data.classification import (
    DEFAULT_LABEL_COLUMN,
    ClassificationCollator,
    ClassificationDataset,
    class_names_from,
)
from umd_lightning.data.collate import PretrainCollator
from umd_lightning.data.common import SPLITS, OnError, ScanMode, ScanReport, Split, require_samples
from umd_lightning.data.datamodule import check_loader_options
from umd_lightning.data.records import Record
from umd_lightning.data.retrieval import (
    ImageTextPairs,
    RetrievalEvalSplit,
    RetrievalTrainCollator,
    collate_images,
    make_eval_split,
    read_retrieval_records,
)
from umd_lightning.data.sampler import make_loader
from umd_lightning.data.sources.medmnist import medmnist_records
from umd_lightning.data.sources.medpix import medpix_records
from umd_lightning.data.sources.melinda import melinda_records
from umd_lightning.data.transforms import image_transform
from umd_lightning.data.vqa import VQACollator, VQADataset, holdout_by_image, read_vqa_records
from umd_lightning.errors import ConfigError, check_range
from umd_lightning.models.text import load_tokenizer
from umd_lightning.seeds import run_seed

Mode = Literal["task", "calib"]
STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


class DownstreamDataModule(LightningDataModule):
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
        super().__init__()
        if mode not in ("task", "calib"):
            raise ConfigError(f"data.init_args.mode must be 'task' or 'calib', got {mode!r}")
        check_loader_options(batch_size, num_workers, max_text_length, mask_ratio_text, image_size)
        self.root = root
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_length = max_text_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mode: Mode = mode
        self.mask_ratio_text = mask_ratio_text
        self.on_error: OnError = on_error
        self.scan: ScanMode = scan
        self.seed = seed
        self.split_seed = split_seed
        self.records: dict[Split, list[Record]] = {}
        self.datasets: dict[Split, Dataset] = {}
        self.scan_reports: list[ScanReport] = []
        self.leaky = False
        self.leak_notes: list[str] = []

    @cached_property
    def text_tokenizer(self) -> PreTrainedTokenizerBase:
        """The loaded fast tokenizer named by ``tokenizer`` (:func:`~umd_lightning.models.text.load_tokenizer`)."""
        return load_tokenizer(self.tokenizer)

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
        """The (image, text) pair of a record for ``calib`` mode: ``{"image", "text", "id"}``."""
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
            return PretrainCollator(
                self.text_tokenizer,
                max_length=self.max_text_length,
                mask_ratio_text=self.mask_ratio_text,
                seed=run_seed(self.seed),
                fixed_masks=split != "train",
            )
        return self._task_collator(split)

    def _loader(self, split: Split, dataset: Dataset | None = None) -> DataLoader:
        if dataset is None:
            if split not in self.datasets:
                raise RuntimeError(f"the {split} split is not built: call setup() with the matching stage first")
            dataset = self.datasets[split]
        return make_loader(
            dataset,
            train=split == "train",
            seed=run_seed(self.seed),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=self._collator(split),
        )

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


class VQADataModule(DownstreamDataModule):
    """Medical VQA: batches of ``VQACollator`` (task) or ``PretrainCollator`` on (image, question) (calib).

    ``answers``, ``num_answers`` and ``answer_vocab`` are known after ``__init__``; ``out_of_vocabulary``
    counts, per split, the questions whose answer is outside the vocabulary (always scored wrong).

    Args:
        dataset: the layout of ``root``: ``vqa_rad`` (official OSF release), ``vqa_rad_preprocessed`` (M3AE),
            ``slake``, ``vqa_med_2019`` (official ImageCLEF release) or ``vqa_med_2019_m3ae``.
        root: the data set's folder.
        max_text_length: questions are truncated to this many tokens.
        batch_size: questions per batch (per process).
        vocab: ``train`` (answers of the official training split, before any hold-out) or ``all_splits``
            (every split's answers, test included, as M3AE and the UMD reference: leaky).
        validation: ``heldout`` (a seeded ``val_fraction`` of the training images, with all their questions;
            the only clean choice for VQA-RAD, which has no validation split), ``official`` (the set's own
            validation split: SLAKE, VQA-Med; M3AE's VQA-RAD ``valset.json`` is a copy of the test set and is
            flagged as leaky) or ``val_is_test`` (validation = test, the M3AE convention: leaky).
        val_fraction: fraction of the training images held out by ``heldout``.
        language: SLAKE question language (``en``; ``None`` keeps all).
        categories: VQA-Med-2019 categories (default modality, plane, organ; ``abnormality`` opt-in).
        skip_empty_answers: SLAKE: skip and count records with an empty answer even with ``on_error: raise`` (the
            published ``train.json`` has one, qid 1622); the shipped SLAKE configs turn it on.
        **kwargs: the shared options (tokenizer, image_size, num_workers, mode, mask_ratio_text, on_error, scan,
            seed, split_seed), see :class:`DownstreamDataModule`.

    Raises:
        ValueError: ``official`` validation for a set without a validation split, or bad option values.
    """

    task = "vqa"

    def __init__(
        self,
        dataset: Literal["vqa_rad", "vqa_rad_preprocessed", "slake", "vqa_med_2019", "vqa_med_2019_m3ae"],
        root: str,
        max_text_length: int = 32,
        batch_size: int = 64,
        vocab: Literal["train", "all_splits"] = "train",
        validation: Literal["heldout", "val_is_test", "official"] = "heldout",
        val_fraction: float = 0.1,
        language: str | None = "en",
        categories: list[str] | None = None,
        skip_empty_answers: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, max_text_length=max_text_length, batch_size=batch_size, **kwargs)
        self.name = dataset
        self.dataset = dataset
        if validation == "heldout":
            check_range("data.init_args.val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        self.vocab = vocab
        self.validation = validation
        self.val_fraction = val_fraction
        self.language = language
        self.categories = categories
        reports: list[ScanReport] = []
        records = read_vqa_records(
            dataset,
            root,
            language=language,
            categories=categories,
            on_error=self.on_error,
            reports=reports,
            skip_empty_answers=skip_empty_answers,
        )
        self.scan_reports += reports
        by_split = {split: [r for r in records if r["split"] == split] for split in SPLITS}
        for split in ("train", "test"):
            require_samples(len(by_split[split]), reports, where=root, split=split)
        self.answer_vocab = self._vocabulary(vocab, by_split)
        self.records = self._splits(validation, by_split)
        self.out_of_vocabulary = {
            split: sum(self.answer_vocab.index(r["answer"]) is None for r in recs)
            for split, recs in self.records.items()
        }
        for split, recs in self.records.items():
            closed = sum(r["answer_type"] == "closed" for r in recs)
            rank_zero_info(
                f"{dataset}/{split}: {len(recs)} questions ({closed} closed) on "
                f"{len({r['image_id'] for r in recs})} images, {self.out_of_vocabulary[split]} answers "
                f"outside the {vocab} vocabulary of {len(self.answer_vocab)}"
            )

    def _vocabulary(self, vocab: str, by_split: dict[Split, list[Record]]) -> AnswerVocab:
        if vocab == "train":
            return AnswerVocab.from_answers(r["answer"] for r in by_split["train"])
        if vocab == "all_splits":
            self._leak("vocabulary built from all splits including test")
            return AnswerVocab.from_answers(r["answer"] for split in SPLITS for r in by_split[split])
        raise ValueError(f"vocab must be 'train' or 'all_splits', got {vocab!r}")

    def _splits(self, validation: str, by_split: dict[Split, list[Record]]) -> dict[Split, list[Record]]:
        train, test = by_split["train"], by_split["test"]
        if validation == "heldout":
            train, val = holdout_by_image(train, self.val_fraction, self.split_seed)
            return {"train": train, "val": val, "test": test}
        if validation == "val_is_test":
            self._leak("validation is the test set")
            return {"train": train, "val": test, "test": test}
        if validation == "official":
            if not by_split["val"]:
                raise ValueError(f"{self.dataset} has no validation split: use validation='heldout' (or 'val_is_test')")
            if self.dataset == "vqa_rad_preprocessed":
                self._leak("validation is M3AE's valset.json, a copy of the test set")
            return {"train": train, "val": by_split["val"], "test": test}
        raise ValueError(f"validation must be 'heldout', 'val_is_test' or 'official', got {validation!r}")

    @property
    def num_outputs(self) -> int:
        return self.num_answers

    @property
    def labels(self) -> list[str]:
        return self.answers

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary (class id = position)."""
        return list(self.answer_vocab.answers)

    @property
    def num_answers(self) -> int:
        """Size of the answer vocabulary, the VQA head's output width."""
        return len(self.answer_vocab)

    def _pair(self, record: Record) -> Record:
        return {"image": record["image"], "text": record["question"], "id": record["qid"]}

    def _task_dataset(self, split: Split, train: bool) -> Dataset:
        return VQADataset(
            self.records[split],
            self.transform(train),
            self.answer_vocab,
            name=f"{self.name}/{split}",
            on_error=self.on_error,
            scan=self.scan,
        )

    def _task_collator(self, split: Split) -> VQACollator:
        return VQACollator(self.text_tokenizer, self.max_text_length, num_answers=self.num_answers)


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
        self.records = {split: [r for r in records if r["split"] == split] for split in SPLITS}
        self.class_names = class_names_from(records)
        known = set(self.class_names)
        for split in ("val", "test"):
            unseen = sorted({r["label_name"] for r in self.records[split]} - known)
            if unseen:
                raise ValueError(
                    f"{dataset} {split} split: label(s) {unseen} of column {self.label_column!r} were not "
                    f"seen in training; training classes are {self.class_names}"
                )
        for split, recs in self.records.items():
            counts = Counter(r["label_name"] for r in recs)
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
        return {"image": record["image"], "text": record["text"], "id": record["id"]}

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
        self.records = {split: [r for r in records if r["split"] == split] for split in SPLITS}
        distinct = len({r["text"] for r in self.records["train"]})
        if self.mode == "task" and (num_candidates < 2 or distinct < num_candidates):
            raise ConfigError(
                f"data.init_args.num_candidates={num_candidates} needs at least 2 and at most the {distinct} distinct "
                f"training captions of {dataset} at {root}"
            )
        self.eval_splits: dict[Split, RetrievalEvalSplit] = {}
        for split, recs in self.records.items():
            rank_zero_info(f"{dataset}/{split}: {len(recs)} pairs, {len({r['text'] for r in recs})} distinct captions")

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
                [r["text"] for r in self.records["train"]],
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
