"""The image-text datasets over the one record type (``records.Record``): ``PairDataset``, the pre-training
sources' base (one checked image and its texts), and ``ImageTextPairs`` (retrieval training and every task's
TD-Calib pairs). Both run the set-up scan, apply ``on_error`` and give samples ``{"image", "text", "id"}``.
``ScannedRecords``, the base of ``ImageTextPairs``, is also the base of the VQA and classification datasets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from umd_lightning.data.common import OnError, RuntimeSkips, load_scanned_image
from umd_lightning.data.records import Record
from umd_lightning.data.scan import Filtered, ScanMode, ScanReport, check_image, scan, scan_images

log = logging.getLogger(__name__)


Transform = Callable[[Any], Any]


Sample = dict[str, Any]


MIN_WORDS = 3
"""ROCO captions and MedICaT in-text references with fewer words are left out (DATA.md)."""


class PairDataset(Dataset):
    """Base of the pair datasets: holds the checked images, the (image, text) pairs and the scan report.

    Subclasses read their layout and call ``_load`` once with the raw records and a function that turns one
    raw record into a ``Record`` (``id``, ``image``, ``file``, ``texts``), returns a ``Filtered`` for a record left
    out on purpose or raises ``DataError`` for a defect.
    """

    def __init__(self, *, name: str, transform: Transform | None, on_error: OnError, scan_mode: ScanMode) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if scan_mode not in ("full", "header", "none"):
            raise ValueError(f"scan must be 'full', 'header' or 'none', got {scan_mode!r}")
        self.name = name
        self.transform = transform
        self.on_error: OnError = on_error
        self.scan_mode: ScanMode = scan_mode
        self.images: list[Record] = []
        self.pairs: list[tuple[int, int]] = []
        self.report = ScanReport(name=name)
        self.skips = RuntimeSkips()
        """Samples dropped after the scan because their image stopped decoding (``on_error="skip"``)."""

    def _load(self, items: Sequence[Any], make_record: Callable[[Any], Record | Filtered]) -> None:
        def check(item: Any) -> Record | Filtered:
            record = make_record(item)
            if isinstance(record, Filtered):
                return record
            noted.note_image(
                check_image(record.image, self.scan_mode, file=record.file, record=record.id), record.image, record.id
            )
            return record

        noted = ScanReport(name=self.name)
        self.images, report = scan(items, check, name=self.name, on_error=self.on_error)
        report.notes, report.note_examples = noted.notes, noted.note_examples
        if noted.notes:
            log.warning(report.summary())
        if report.filtered:
            log.info("after filters: %s", report.summary())
        self.report = report
        self.pairs = [(i, j) for i, record in enumerate(self.images) for j in range(len(record.texts))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample | None:
        """Return ``{"image": FloatTensor (3, H, W) (PIL RGB without a transform), "text": str, "id": str}``.

        Returns ``None`` (under ``on_error="skip"``) when the image no longer decodes.

        Raises:
            DataError: the image no longer decodes and ``on_error == "raise"``.
        """
        image_index, text_index = self.pairs[index]
        record = self.images[image_index]
        image = load_scanned_image(
            record.image, on_error=self.on_error, file=record.file, record=record.id, skips=self.skips
        )
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "text": record.texts[text_index], "id": record.id}


class ScannedRecords(Dataset):
    """Base of the datasets over records whose images are scanned at construction (each distinct file once):
    ``ImageTextPairs`` and the downstream tasks' datasets. A subclass builds its samples in ``__getitem__`` from
    ``self.records`` and :meth:`_load_image`.

    Args:
        records: records with ``image`` (path) and ``id``.
        transform: PIL RGB image -> ``(3, H, W)`` tensor.
        name: name in the scan report.
        on_error: ``raise`` fails on the first bad image, ``skip`` drops and counts it; an image that stops
            decoding after the scan raises ``DataError`` from ``__getitem__`` (``raise``) or gives a ``None``
            sample that the collate drops (``skip``).
        scan: how much of each image the set-up scan reads.
        progress: show the scan's progress bar.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        name: str,
        on_error: OnError,
        scan: ScanMode,
        progress: bool,
    ) -> None:
        self.records, report = scan_images(records, name=name, mode=scan, on_error=on_error, progress=progress)
        self.reports: list[ScanReport] = [report]
        self.transform = transform
        self.on_error: OnError = on_error
        self.skips = RuntimeSkips()
        """Samples dropped after the scan because their image stopped decoding (``on_error="skip"``)."""

    def __len__(self) -> int:
        return len(self.records)

    def _load_image(self, record: Record) -> Image.Image | None:
        """The record's scanned image, or ``None`` when it no longer decodes and ``on_error == "skip"``."""
        return load_scanned_image(record.image, on_error=self.on_error, record=record.id, skips=self.skips)


class ImageTextPairs(ScannedRecords):
    """(image, text) samples ``{"image": (3, H, W) tensor, "text": str, "id": str}``: retrieval training and
    every task's TD-Calib pairs. Image files are scanned at construction (each distinct file once).

    Args:
        records: records with ``image`` (path), ``id`` and one text.
        transform: PIL RGB image -> ``(3, H, W)`` tensor.
        name, on_error, scan, progress: as for :class:`ScannedRecords`.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        name: str = "pairs",
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        progress: bool = True,
    ) -> None:
        super().__init__(records, transform, name=name, on_error=on_error, scan=scan, progress=progress)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = self._load_image(record)
        if image is None:
            return None
        return {"image": self.transform(image), "text": record.text, "id": record.id}
