"""``umd data pack``: write a pre-training config's sources once, pre-resized, as a pack of litdata shards.

``umd data pack --config configs/pretrain/medpix.yaml --out DIR [--image_size N] [--encoding png|raw|jpeg]
[--split train,val,test] [--workers N] [--data.*]``

Reads the ``data:`` section of a pre-training YAML (a ``PretrainDataModule``) with the same ``--data.*`` overrides as
``umd fit``, reads every split through the same source readers (same records, ids, texts, filters and
``on_error`` policy), decodes each image once, applies the deterministic resize of the split's transform at the
config's image size (or ``--image_size``) and writes one item per (image, text) pair into litdata chunks, in the
raw dataset's order. ``DIR/manifest.json``, written last, records the source config, the counts, what was left out,
the image size, the encoding and the library versions; ``DIR/data.yaml`` is the ``data:`` section that trains on the
pack (``umd fit --config <stage yaml> --config DIR/data.yaml``). The pack is written under ``DIR.incomplete`` and
renamed when complete, so ``DIR`` is a whole pack or nothing.

Exit status: 0 written; 1 a data error stopped it (``on_error: raise``: the record is named); 2 a configuration
error (an existing ``--out``, an option out of range, a config without pre-training sources).

Why not litdata's ``optimize``: its workers hand items to the writer in completion order (or need
``keep_data_ordered``) and its ``fn`` has no way to report a skipped record to the caller; here a ``DataLoader``
decodes in worker processes and returns results in order, the main process applies ``on_error`` and counts skips,
and litdata's own ``BinaryWriter`` writes the chunks and ``index.json`` that ``StreamingDataset`` reads.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from umd_lightning.data.check import (
    FILTER_KINDS,
    one_line,
    parse_args_and_overrides,
    quiet_loggers,
    read_data_section,
    with_overrides,
)
from umd_lightning.data.common import OnError, load_image
from umd_lightning.data.datamodule import PretrainDataModule
from umd_lightning.data.packed import (
    ENCODINGS,
    GEOMETRY,
    MANIFEST,
    PACK_FORMAT,
    Encoding,
    Manifest,
    PackSplit,
    encode_image,
    import_litdata,
)
from umd_lightning.data.pretrain import PretrainConcatDataset, build_pretrain_datasets
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanReport
from umd_lightning.data.transforms import fixed_geometry
from umd_lightning.errors import ConfigError, DataError, check_range

PACK_SPLITS = ("train", "val", "test")
MAX_EXAMPLES = 3


class _EncodedImages(Dataset):
    """Record ``i`` -> ``(i, encoded bytes, channels)``, or ``(i, DataError, 0)`` when its image does not decode
    (returned, not raised, so the main process applies ``on_error`` with the record named)."""

    def __init__(self, records: Sequence[Record], image_size: int, train: bool, encoding: Encoding, quality: int):
        self.records = records
        self.geometry = v2.Compose([v2.ToImage(), *fixed_geometry(image_size, train)])
        self.encoding: Encoding = encoding
        self.quality = quality

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, bytes | DataError, int]:
        record = self.records[index]
        try:
            image = load_image(record.image, file=record.file or None, record=record.id)
        except DataError as error:
            return index, error, 0
        pixels = self.geometry(image).as_subclass(torch.Tensor)
        data, channels = encode_image(pixels, self.encoding, self.quality)
        return index, data, channels


def _as_is(item: Any) -> Any:
    return item


def _source_split(datamodule: PretrainDataModule, split: str) -> str:
    return datamodule.val_split if split == "val" else split


def _scan_counts(dataset: PretrainConcatDataset, packed: PackSplit) -> None:
    """Add the sources' set-up scan (records read, data errors skipped, filters) to the split's counts."""
    for report in dataset.reports:
        packed.read += report.read
        for kind, count in report.problems.items():
            packed.skipped[kind] = packed.skipped.get(kind, 0) + count
            if report.examples.get(kind):
                packed.examples.setdefault(kind, []).extend(report.examples[kind][:MAX_EXAMPLES])


def pack_split(
    datamodule: PretrainDataModule,
    split: str,
    folder: Path,
    *,
    image_size: int,
    encoding: Encoding,
    jpeg_quality: int,
    workers: int,
    chunk_bytes: str,
) -> tuple[PackSplit, list[ScanReport]]:
    """Read one split's sources and write its chunks into ``folder``.

    Raises:
        DataError: a bad record under ``on_error: raise`` (from the sources' scan or from decoding an image).
    """
    train = split == "train"
    on_error: OnError = datamodule.on_error
    # Every image is decoded below, once, which is what the "full" scan would do at set-up; the scan here only
    # opens headers, so a missing or non-image file is still found in the sources' own report.
    scan = "header" if datamodule.scan == "full" else datamodule.scan
    dataset = build_pretrain_datasets(
        datamodule.sources, _source_split(datamodule, split), None, on_error=on_error, scan=scan
    )
    records = [record for source in dataset.datasets for record in source.images]
    packed = PackSplit(source_split=_source_split(datamodule, split), geometry=GEOMETRY[train])
    _scan_counts(dataset, packed)
    images = _EncodedImages(records, image_size, train, encoding, jpeg_quality)
    prefetch = {"prefetch_factor": 8} if workers else {}
    loader = DataLoader(images, batch_size=None, num_workers=workers, collate_fn=_as_is, **prefetch)
    import_litdata()
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(folder), chunk_bytes=chunk_bytes)
    for index, data, channels in tqdm(loader, total=len(records), desc=f"pack {split}", unit="img"):
        record = records[index]
        if isinstance(data, DataError):
            if on_error == "raise":
                raise data
            packed.skipped[data.kind] = packed.skipped.get(data.kind, 0) + 1
            shown = packed.examples.setdefault(data.kind, [])
            if len(shown) < MAX_EXAMPLES:
                shown.append(str(data))
            continue
        for text in record.texts:
            writer.add_item(packed.pairs, {"id": record.id, "text": text, "image": data, "channels": channels})
            packed.pairs += 1
        packed.records += 1
        packed.grey_records += channels == 1
    if packed.pairs:
        writer.done()
        writer.merge(num_workers=1)
        packed.bytes = sum(path.stat().st_size for path in folder.glob("chunk-*.bin"))
    return packed, dataset.reports


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("umd_lightning", "litdata", "torch", "torchvision", "pillow")}


def _training_section(datamodule: PretrainDataModule, out: Path, image_size: int) -> dict[str, Any]:
    """The ``data:`` section that trains on the pack with the packed config's text and loader options."""
    init_args = {
        "pack": str(out.resolve()),
        "tokenizer": datamodule.tokenizer,
        "image_size": image_size,
        "max_text_length": datamodule.max_text_length,
        "mask_ratio_text": datamodule.mask_ratio_text,
        "batch_size": datamodule.batch_size,
        "num_workers": datamodule.num_workers,
        "seed": datamodule.seed,
    }
    return {"data": {"class_path": "umd_lightning.data.PackedPretrainDataModule", "init_args": init_args}}


def _pretrain_datamodule(section: dict[str, Any], config: str) -> PretrainDataModule:
    from umd_lightning.data.check import build_datamodule

    module_name, _, class_name = str(section["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"data.class_path {section['class_path']!r} in {config} cannot be imported") from None
    if not (isinstance(cls, type) and issubclass(cls, PretrainDataModule)):
        raise ConfigError(
            f"umd data pack packs pre-training sources (umd_lightning.data.PretrainDataModule); the data of {config} "
            f"is {section['class_path']}: use a configs/pretrain/*.yaml"
        )
    datamodule = build_datamodule(section)
    assert isinstance(datamodule, PretrainDataModule)
    return datamodule


def pack(
    config: str,
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    image_size: int | None = None,
    encoding: Encoding = "png",
    jpeg_quality: int = 95,
    splits: Sequence[str] = PACK_SPLITS,
    workers: int = 0,
    chunk_bytes: str = "64MB",
) -> Manifest:
    """Write the pack of ``config``'s pre-training sources to ``out`` (see the module docstring); the manifest.

    Raises:
        ConfigError: ``out`` exists, an option is out of range, or the config is not a pre-training one.
        DataError: a bad record under ``on_error: raise``, or a train split left empty by the scan.
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists: umd data pack never overwrites; choose a new folder or delete it")
    if encoding not in ENCODINGS:
        raise ConfigError(f"--encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    check_range("--jpeg_quality", jpeg_quality, low=1, high=100)
    check_range("--workers", workers, low=0)
    if not re.fullmatch(r"\d+(\.\d+)?[kmgt]?b", chunk_bytes.strip().lower()):
        raise ConfigError(f"--chunk_bytes {chunk_bytes!r}: give a size with its unit, e.g. 64MB or 1GB")
    unknown = [split for split in splits if split not in PACK_SPLITS]
    if unknown or "train" not in splits:
        raise ConfigError(f"--split takes train and any of val,test (comma-separated), got {','.join(splits)}")
    # A plain copy for the manifest: jsonargparse turns the section it validates into Namespaces in place.
    section = json.loads(json.dumps(with_overrides(read_data_section(config), overrides), default=str))
    datamodule = _pretrain_datamodule(copy.deepcopy(section), config)
    size = datamodule.image_size if image_size is None else image_size
    check_range("--image_size", size, low=1)
    work = out.with_name(out.name + ".incomplete")
    if work.exists():
        print(f"umd data pack: removing {work}, left by an interrupted pack")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        manifest = Manifest(
            format=PACK_FORMAT,
            image_size=size,
            encoding=encoding,
            jpeg_quality=jpeg_quality if encoding == "jpeg" else None,
            splits={},
            source_config=str(config),
            data=section,
            versions=_versions(),
        )
        for split in dict.fromkeys(splits):
            packed, reports = pack_split(
                datamodule,
                split,
                work / split,
                image_size=size,
                encoding=encoding,
                jpeg_quality=jpeg_quality,
                workers=workers,
                chunk_bytes=chunk_bytes,
            )
            if split == "train" and packed.pairs == 0:
                found = ", ".join(f"{kind} {n}" for kind, n in sorted(packed.skipped.items())) or "nothing"
                where = ", ".join(source.root for source in datamodule.sources)
                raise DataError("empty_split", where, None, f"no usable train pair to pack (skipped: {found})")
            manifest.splits[split] = packed
            print(describe_split(split, packed, reports))
        (work / "data.yaml").write_text(
            f"# Train on this pack: umd fit --config <stage yaml> --config {out / 'data.yaml'}\n"
            + yaml.safe_dump(_training_section(datamodule, out, size), sort_keys=False)
        )
        (work / MANIFEST).write_text(manifest.to_json())
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def describe_split(split: str, packed: PackSplit, reports: Sequence[ScanReport]) -> str:
    """The lines printed for one packed split: the counts, then every kind left out with its first messages."""
    names = ", ".join(report.name for report in reports)
    lines = [
        f"{split}: {packed.read} records read ({names}), {packed.records} images / {packed.pairs} pairs packed "
        f"({packed.grey_records} stored grey), {packed.bytes / 1e6:.2f} MB"
    ]
    for kind, count in sorted(packed.skipped.items()):
        why = " (a filter, not an error)" if kind in FILTER_KINDS else ""
        lines.append(f"  left out, {kind}: {count}{why}")
        lines += [f"    {message}" for message in packed.examples.get(kind, [])]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parts = (__doc__ or "").split("\n\n")
    parser = argparse.ArgumentParser(
        prog="umd data pack",
        description="\n\n".join(parts[:3]),
        epilog=parts[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="a pre-training YAML; its data: section is packed")
    parser.add_argument("--out", required=True, help="the pack folder to create (must not exist)")
    parser.add_argument("--image_size", type=int, default=None, help="side of the stored squares (default: config's)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="png", help="png (lossless, default), raw, jpeg")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality with --encoding jpeg (95)")
    parser.add_argument("--split", default=",".join(PACK_SPLITS), help="splits to pack (default: train,val,test)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, len(os.sched_getaffinity(0))),
        help="decoding processes (default: the cores, at most 8); 0 decodes in this process",
    )
    parser.add_argument("--chunk_bytes", default="64MB", help="size of one litdata chunk file (64MB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``umd data pack``; the exit status (0 written, 1 data error, 2 configuration error)."""
    try:
        args, overrides = parse_args_and_overrides(make_parser(), argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    splits = [part.strip() for part in args.split.split(",") if part.strip()]
    try:
        with quiet_loggers():
            manifest = pack(
                args.config,
                args.out,
                overrides=overrides,
                image_size=args.image_size,
                encoding=args.encoding,
                jpeg_quality=args.jpeg_quality,
                splits=splits,
                workers=args.workers,
                chunk_bytes=args.chunk_bytes,
            )
    except DataError as error:
        print(f"umd data pack: data error: {error}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"umd data pack: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    pairs = sum(split.pairs for split in manifest.splits.values())
    size = sum(split.bytes for split in manifest.splits.values())
    print(f"wrote {args.out}: {pairs} pairs, {size / 1e6:.1f} MB ({manifest.image_size} px, {manifest.encoding})")
    print(f"train on it: umd fit --config {args.config} --config {Path(args.out) / 'data.yaml'}")
    return 0
