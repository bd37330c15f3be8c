"""The VQA DataModule: answer vocabulary policy, validation policy, VQA or calib batches."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from umd_lightning.data.answers import AnswerVocab
from umd_lightning.data.common import SPLITS, Split
from umd_lightning.data.datamodules.downstream import DownstreamDataModule
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanReport, require_samples
from umd_lightning.data.vqa import VQACollator, VQADataset, holdout_by_image, read_vqa_records
from umd_lightning.errors import check_range


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
        by_split = {split: [r for r in records if r.split == split] for split in SPLITS}
        for split in ("train", "test"):
            require_samples(len(by_split[split]), reports, where=root, split=split)
        self.answer_vocab = self._vocabulary(vocab, by_split)
        self.records = self._splits(validation, by_split)
        self.out_of_vocabulary = {
            split: sum(self.answer_vocab.index(r.answer) is None for r in recs) for split, recs in self.records.items()
        }
        for split, recs in self.records.items():
            closed = sum(r.answer_type == "closed" for r in recs)
            rank_zero_info(
                f"{dataset}/{split}: {len(recs)} questions ({closed} closed) on "
                f"{len({r.image_id for r in recs})} images, {self.out_of_vocabulary[split]} answers "
                f"outside the {vocab} vocabulary of {len(self.answer_vocab)}"
            )

    def _vocabulary(self, vocab: str, by_split: dict[Split, list[Record]]) -> AnswerVocab:
        if vocab == "train":
            return AnswerVocab.from_answers(r.answer for r in by_split["train"])
        if vocab == "all_splits":
            self._leak("vocabulary built from all splits including test")
            return AnswerVocab.from_answers(r.answer for split in SPLITS for r in by_split[split])
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

    @property
    def question_types(self) -> list[str]:
        """The question types of the test split, sorted (the rows of the per-type accuracy at test); empty when
        the set's records carry none."""
        return sorted({kind for record in self.records["test"] for kind in record.question_types})

    def _pair(self, record: Record) -> Record:
        return Record(id=record.id, image=record.image, texts=(record.question,))

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
