"""Pre-training sources: the registry of publisher layouts (one class per layout, in ``data/sources/<publisher>.py``
over ``data/datasets.PairDataset``) and building a split from several sources.

DATA.md "Pre-training and retrieval" describes each layout. Every dataset:

- reads the annotations and checks every record at construction (``scan.scan``): the text must be non-empty,
  the image path must stay inside the root, and the image is decoded (``scan="full"``), opened (``"header"``)
  or not touched (``"none"``); the outcome is kept as ``dataset.report`` (a ``ScanReport``);
- counts records left out on purpose (a ROCO caption under 3 words, a lateral MIMIC view, ...) in the report
  under their own kind, even with ``on_error="raise"``: they are filters, not errors;
- returns samples ``{"image": transform(RGB PIL image), "text": str, "id": str}``; one image with several
  texts gives one sample per text, all with the image's id (so a consumer can tell that two samples share an
  image);
- returns ``None`` from ``__getitem__`` under ``on_error="skip"`` when an image that passed the scan no longer
  decodes (the collate drops it), and raises the ``DataError`` under ``"raise"``.

``report.read`` and ``report.kept`` count annotation records (images, figures); ``len(dataset)`` counts pairs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch.utils.data import ConcatDataset

from umd_lightning.data.common import OnError
from umd_lightning.data.datasets import PairDataset, Transform
from umd_lightning.data.scan import ScanMode, ScanReport
from umd_lightning.data.sources.jsonl import JsonlDataset
from umd_lightning.data.sources.medicat import MedicatDataset
from umd_lightning.data.sources.medpix import MedPixDataset
from umd_lightning.data.sources.mimic_cxr import MimicCxrDataset
from umd_lightning.data.sources.roco import RocoDataset

log = logging.getLogger(__name__)


SourceFormat = Literal["roco", "medicat", "mimic_cxr", "medpix", "jsonl"]

DATASET_CLASSES: dict[str, type[PairDataset]] = {
    "roco": RocoDataset,
    "medicat": MedicatDataset,
    "mimic_cxr": MimicCxrDataset,
    "medpix": MedPixDataset,
    "jsonl": JsonlDataset,
}


def register_source(format: str, dataset_class: type[PairDataset]) -> None:
    """Add a pre-training source format: ``SourceSpec(format=...)`` and :func:`build_pretrain_dataset` then build
    ``dataset_class(root, split=..., transform=..., on_error=..., scan=..., **options)`` for it (CONTRIBUTING.md,
    "Adding a data set"). A format shipped with the package is also added to ``SourceFormat``, so YAML configs
    validate it.

    Raises:
        ValueError: the format is registered already.
        TypeError: ``dataset_class`` is not a :class:`PairDataset`.
    """
    if format in DATASET_CLASSES:
        raise ValueError(f"source format {format!r} is registered already ({DATASET_CLASSES[format].__name__})")
    if not (isinstance(dataset_class, type) and issubclass(dataset_class, PairDataset)):
        raise TypeError(f"a source format needs a PairDataset subclass, got {dataset_class!r}")
    DATASET_CLASSES[format] = dataset_class


@dataclass
class SourceSpec:
    """One pre-training source, as written in YAML: ``{format: roco, root: /data/roco, options: {...}}``.

    Attributes:
        format: the publisher layout: ``roco``, ``medicat``, ``mimic_cxr``, ``medpix`` or ``jsonl``.
        root: the data set's folder (for ``jsonl``, the JSONL file).
        options: keyword arguments of the format's dataset class, e.g. ``{views: [PA]}`` for ``mimic_cxr`` or
            ``{exclude_vqa_rad_overlap: true}`` for ``medpix``; ``on_error`` and ``scan`` here override the
            DataModule's.
    """

    format: SourceFormat
    root: str
    options: dict[str, Any] = field(default_factory=dict)


def source_options(format: str) -> list[str]:
    """The options a source of this format accepts (its dataset class's keyword arguments).

    Raises:
        ValueError: unknown format (the message lists the valid ones).
    """
    if format not in DATASET_CLASSES:
        raise ValueError(f"unknown source format {format!r}: choose one of {sorted(DATASET_CLASSES)}")
    parameters = list(inspect.signature(DATASET_CLASSES[format].__init__).parameters)
    # self, the root/path, the split and the transform are set by the caller, not by options.
    return [name for name in parameters[2:] if name not in ("split", "transform")]


def build_pretrain_dataset(
    spec: SourceSpec,
    split: str,
    transform: Transform | None = None,
    *,
    on_error: OnError = "raise",
    scan: ScanMode = "full",
) -> PairDataset:
    """Build one source's dataset for ``split`` (each class maps ``val`` to its own name for the split).

    ``on_error`` and ``scan`` apply unless ``spec.options`` sets them.

    Raises:
        ValueError: unknown format or option (the message lists the valid ones).
    """
    valid = source_options(spec.format)
    unknown = sorted(set(spec.options) - set(valid))
    if unknown:
        raise ValueError(f"{spec.format} source at {spec.root}: unknown option(s) {unknown}, valid options: {valid}")
    options = {"on_error": on_error, "scan": scan, **spec.options}
    return DATASET_CLASSES[spec.format](spec.root, split=split, transform=transform, **options)


class PretrainConcatDataset(ConcatDataset):
    """Several sources' datasets end to end, keeping each source's scan report."""

    datasets: list[PairDataset]

    @property
    def reports(self) -> list[ScanReport]:
        return [dataset.report for dataset in self.datasets]


def build_pretrain_datasets(
    specs: Iterable[SourceSpec],
    split: str,
    transform: Transform | None = None,
    *,
    on_error: OnError = "raise",
    scan: ScanMode = "full",
) -> PretrainConcatDataset:
    """Build every source's dataset for ``split`` and concatenate them (see ``build_pretrain_dataset``)."""
    datasets = [build_pretrain_dataset(spec, split, transform, on_error=on_error, scan=scan) for spec in specs]
    if not datasets:
        raise ValueError("no pre-training sources given")
    return PretrainConcatDataset(datasets)
