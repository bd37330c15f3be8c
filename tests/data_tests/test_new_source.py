"""CONTRIBUTING.md's recipe for adding a data set, followed for a small made-up layout ("tsv_pairs": one
``pairs.tsv`` of ``<image>\\t<split>\\t<caption>`` lines beside ``images/``): a source class, a registry entry and
a fixture generator; the pre-training DataModule then reads and batches it like a shipped source."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from umd_lightning.data.common import OnError, safe_join
from umd_lightning.data.datamodule import PretrainDataModule
from umd_lightning.data.datasets import PairDataset, Transform
from umd_lightning.data.files import canonical_split, clean_text, decode_line, read_lines
from umd_lightning.data.pretrain import DATASET_CLASSES, SourceSpec, build_pretrain_dataset, register_source
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanMode
from umd_lightning.data.synthetic import caption, random_scene, render
from umd_lightning.errors import DataError


# 1. The source: reads its files once, with the shared file rules, into the record type the datasets take.
class TsvPairs(PairDataset):
    """``<root>/pairs.tsv`` lines ``<image>\\t<split>\\t<caption>``; images under ``<root>/images/``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
    ) -> None:
        super().__init__(name=f"tsv_pairs/{split}", transform=transform, on_error=on_error, scan_mode=scan)
        split = canonical_split(split, {"train": "train", "val": "val", "test": "test"}, "tsv_pairs")
        file = Path(root) / "pairs.tsv"
        lines = [(n, raw) for n, raw in read_lines(file) if decode_line(raw, file=file, line=n).split("\t")[1] == split]

        def make_record(item: tuple[int, bytes]) -> Record:
            number, raw = item
            image, _, text = decode_line(raw, file=file, line=number).split("\t")
            path = safe_join(Path(root) / "images", image, file=file, record=f"line {number}")
            return Record(id=image, image=path, file=str(file), texts=(clean_text(text, file=file, record=image),))

        self._load(lines, make_record)


# 3. The fixture generator: the synthetic package's scenes and captions, written in the new layout.
def write_tsv_pairs(root: Path, n: int = 8, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(n):
        scene = random_scene(rng)
        name = f"scan{index}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        render(scene, size, rng).save(root / "images" / name)
        split = "train" if index < n - 2 else "val"
        lines.append(f"{name}\t{split}\t{caption(scene, rng)}")
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# 2. The registry entry.
@pytest.fixture
def tsv_pairs() -> Iterator[str]:
    register_source("tsv_pairs", TsvPairs)
    yield "tsv_pairs"
    del DATASET_CLASSES["tsv_pairs"]


def test_a_registered_source_is_read_and_batched_like_a_shipped_one(tmp_path: Path, tsv_pairs: str) -> None:
    root = write_tsv_pairs(tmp_path / "tsv")
    data = PretrainDataModule(
        sources=[{"format": tsv_pairs, "root": str(root)}], image_size=32, batch_size=3, num_workers=0, seed=0
    )
    data.setup("fit")
    assert len(data.train_dataset) == 6 and len(data.val_dataset) == 2
    assert data.train_dataset.reports[0].kept == 6
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 3 and "mlm_labels" in batch
    first = build_pretrain_dataset(SourceSpec(tsv_pairs, str(root)), "train", scan="header")[0]
    assert first["id"] == "scan0.png" and first["text"].endswith(".")


def test_the_shared_file_rules_apply_to_a_new_source(tmp_path: Path, tsv_pairs: str) -> None:
    root = write_tsv_pairs(tmp_path / "tsv")
    with (root / "pairs.tsv").open("a", encoding="utf-8") as handle:
        handle.write("../outside.png\ttrain\ta CT of the chest\n")
    with pytest.raises(DataError, match=r"pairs\.tsv, record line 9: .*\[unsafe_path\]"):
        build_pretrain_dataset(SourceSpec(tsv_pairs, str(root)), "train")
    skipped = build_pretrain_dataset(SourceSpec(tsv_pairs, str(root)), "train", on_error="skip")
    assert len(skipped) == 6 and skipped.report.problems["unsafe_path"] == 1


def test_a_format_registers_once_and_only_as_a_pair_dataset(tsv_pairs: str) -> None:
    with pytest.raises(ValueError, match="registered already"):
        register_source(tsv_pairs, TsvPairs)
    with pytest.raises(TypeError, match="PairDataset subclass"):
        register_source("other", dict)  # type: ignore[arg-type]
