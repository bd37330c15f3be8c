"""Packs: ``umd data pack`` and ``PackedPretrainDataModule`` against the raw path they replace.

The fixtures are the committed ROCO and JSONL layouts (concatenated: two sources, one record with two texts) and a
synthetic JSONL source written here with images of several shapes. A lossless pack must give the raw DataModule's
batches bit for bit (pixels, tokens, masks, ids, texts) in every split and epoch; a JPEG pack the same records and
texts with pixels within a measured bound. Under real 2-process DDP (gloo) the ranks see disjoint pairs that cover
the split, and a fit stopped mid-epoch and resumed from its checkpoint trains on exactly the batches of the
uninterrupted fit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from PIL import Image
from pipeline_helpers import quiet_trainer

from umd_lightning.data import PackedPretrainDataModule, PretrainDataModule
from umd_lightning.data.pack import main as pack_main
from umd_lightning.data.pack import pack
from umd_lightning.data.packed import MANIFEST, PackedPairs, decode_image, encode_image, open_pack
from umd_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"
FIXTURE_SOURCES = [
    {"format": "roco", "root": str(FIXTURES / "roco")},
    {"format": "jsonl", "root": str(FIXTURES / "jsonl" / "data.jsonl")},
]


def write_config(path: Path, sources: list[dict], **init_args: Any) -> Path:
    data = {"sources": sources, "tokenizer": "minilm", "image_size": 32, "batch_size": 2, "num_workers": 0}
    config = {"data": {"class_path": "umd_lightning.data.PretrainDataModule", "init_args": {**data, **init_args}}}
    path.write_text(yaml.safe_dump(config))
    return path


def raw_datamodule(config: Path) -> PretrainDataModule:
    init_args = yaml.safe_load(config.read_text())["data"]["init_args"]
    return PretrainDataModule(**init_args)


def synthetic_jsonl(root: Path, train: int = 20, val: int = 5) -> Path:
    """``train`` + ``val`` images of several shapes and colours; every fifth one has two texts."""
    lines = []
    for index in range(train + val):
        width, height = 40 + 7 * (index % 5), 36 + 5 * (index % 3)
        colour = (index * 37 % 256, index * 91 % 256, index * 53 % 256) if index % 2 else (index * 9 % 256,) * 3
        image = Image.new("RGB", (width, height), colour)
        image.paste((255 - colour[0], 0, 128), (index % 9, index % 7, index % 9 + 12, index % 7 + 10))
        name = f"images/{index:03d}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        image.save(root / name)
        texts = [f"scan number {index} with a bright patch"] + (["a second caption"] if index % 5 == 0 else [])
        split = "train" if index < train else "val"
        lines.append(json.dumps({"image": name, "text": texts, "split": split, "id": f"s{index:03d}"}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def epoch_batches(loader: Any, epoch: int = 0) -> list[dict]:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return list(loader)


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) > 0
    for one, two in zip(first, second, strict=True):
        assert one.keys() == two.keys()
        for key in one:
            if isinstance(one[key], torch.Tensor):
                assert torch.equal(one[key], two[key]), key
            else:
                assert one[key] == two[key], key


@pytest.mark.slow
def test_lossless_pack_gives_the_raw_batches(tmp_path: Path) -> None:
    # The fixtures' images are square; the synthetic ones are not, so the two geometries differ on them.
    sources = [*FIXTURE_SOURCES, {"format": "jsonl", "root": str(synthetic_jsonl(tmp_path / "src"))}]
    config = write_config(tmp_path / "pretrain.yaml", sources, seed=4)
    manifest = pack(str(config), tmp_path / "pack", workers=2)

    raw = raw_datamodule(config)
    packed = PackedPretrainDataModule(str(tmp_path / "pack"), image_size=32, batch_size=2, num_workers=0, seed=4)
    for datamodule in (raw, packed):
        datamodule.setup("fit")
        datamodule.setup("test")
    # Same pairs in the same order: the ROCO fixture's 9 long captions (a short one is filtered), the JSONL
    # fixture's 13 training pairs (10 images, 3 of them with two texts), the synthetic set's 24 (20 images).
    assert manifest.splits["train"].pairs == len(raw.train_dataset) == len(packed.train_dataset) == 46
    assert manifest.splits["train"].records == 39 and manifest.splits["train"].skipped == {"short_caption": 1}
    assert {name: split.pairs for name, split in manifest.splits.items()} == {"train": 46, "val": 8, "test": 3}
    for epoch in (0, 1):
        assert_same_batches(
            epoch_batches(raw.train_dataloader(), epoch), epoch_batches(packed.train_dataloader(), epoch)
        )
    assert_same_batches(list(raw.val_dataloader()), list(packed.val_dataloader()))
    assert_same_batches(list(raw.test_dataloader()), list(packed.test_dataloader()))

    written = json.loads((tmp_path / "pack" / MANIFEST).read_text())
    assert written["image_size"] == 32 and written["encoding"] == "png" and written["versions"]["litdata"]
    assert written["data"]["init_args"]["sources"] == sources and written["source_config"] == str(config)
    training = yaml.safe_load((tmp_path / "pack" / "data.yaml").read_text())["data"]
    assert training["class_path"] == "umd_lightning.data.PackedPretrainDataModule"
    assert training["init_args"]["pack"] == str((tmp_path / "pack").resolve())
    assert training["init_args"]["seed"] == 4 and training["init_args"]["image_size"] == 32


@pytest.mark.slow
def test_raw_and_jpeg_encodings(tmp_path: Path) -> None:
    source = [{"format": "jsonl", "root": str(synthetic_jsonl(tmp_path / "src"))}]
    config = write_config(tmp_path / "pretrain.yaml", source, image_size=48)
    raw = raw_datamodule(config)
    raw.setup("validate")
    expected = [raw.val_dataset[i] for i in range(len(raw.val_dataset))]
    errors = {}
    for encoding in ("raw", "jpeg"):
        pack(str(config), tmp_path / encoding, encoding=encoding, splits=["train", "val"])
        pairs = PackedPairs(tmp_path / encoding, "val", raw.val_dataset.datasets[0].transform)
        assert len(pairs) == len(expected) == 6
        for got, want in zip(pairs, expected, strict=True):
            assert (got["id"], got["text"]) == (want["id"], want["text"])
            errors.setdefault(encoding, []).append((got["image"] - want["image"]).abs())
    assert max(float(error.max()) for error in errors["raw"]) == 0.0
    # JPEG at quality 95, in normalised units (CLIP std ~0.27, so 0.015 is about one grey level): about a grey level
    # on average, more only at the hard colour edges of the synthetic patches (measured: mean 0.014, 99th
    # percentile 0.31, max 1.36).
    jpeg_errors = torch.cat([error.flatten() for error in errors["jpeg"]])
    assert 0 < float(jpeg_errors.mean()) < 0.03 and float(jpeg_errors.quantile(0.99)) < 0.5
    jpeg, lossless = (open_pack(tmp_path / name).splits["train"].bytes for name in ("jpeg", "raw"))
    assert jpeg < lossless


def test_grey_images_are_stored_with_one_channel() -> None:
    grey = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8).expand(3, -1, -1).contiguous()
    colour = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    for encoding in ("png", "raw"):
        for image, channels in ((grey, 1), (colour, 3)):
            data, stored = encode_image(image, encoding)
            assert stored == channels
            assert torch.equal(decode_image(data, encoding, stored, 8), image)
    assert len(encode_image(grey, "raw")[0]) == 64


@pytest.mark.slow
def test_pack_command_errors_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    roco = tmp_path / "roco"
    shutil.copytree(FIXTURES / "roco", roco)
    broken = roco / "train" / "radiology" / "images" / "ROCO_00002.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # a JPEG header without its pixels: opens, does not decode
    config = write_config(tmp_path / "pretrain.yaml", [{"format": "roco", "root": str(roco)}])
    out = tmp_path / "pack"

    assert pack_main(["--config", str(config), "--out", str(out), "--workers", "0"]) == 1
    error = capsys.readouterr().err
    assert "ROCO_00002" in error and "bad_image" in error and not out.exists()
    assert not out.with_name("pack.incomplete").exists()

    skip = ["--data.init_args.on_error=skip", "--workers", "1"]
    assert pack_main(["--config", str(config), "--out", str(out), *skip]) == 0
    printed = capsys.readouterr().out
    assert "left out, bad_image: 1" in printed and "ROCO_00002" in printed
    assert open_pack(out).splits["train"].skipped == {"bad_image": 1, "short_caption": 1}
    assert open_pack(out).splits["train"].pairs == 8

    assert pack_main(["--config", str(config), "--out", str(out)]) == 2
    assert f"--out {out} exists" in capsys.readouterr().err
    finetune = REPO / "configs" / "finetune" / "vqa_rad.yaml"
    assert pack_main(["--config", str(finetune), "--out", str(tmp_path / "other")]) == 2
    assert "packs pre-training sources" in capsys.readouterr().err
    assert pack_main(["--config", str(config), "--out", str(tmp_path / "x"), "--split", "val"]) == 2
    assert "--split takes train" in capsys.readouterr().err
    assert pack_main(["--config", str(config), "--out", str(tmp_path / "x"), "--chunk_bytes", "64"]) == 2
    assert "give a size with its unit" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_packs_are_refused_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "pretrain.yaml", FIXTURE_SOURCES)
    good = tmp_path / "pack"
    pack(str(config), good, splits=["train"])

    def refusal(path: Path, **options: Any) -> str:
        with pytest.raises(ConfigError) as info:
            PackedPretrainDataModule(str(path), **{"image_size": 32, **options})
        return str(info.value)

    assert "does not exist" in refusal(tmp_path / "nowhere")
    assert "holds 32 px images but data.init_args.image_size is 64" in refusal(good, image_size=64)
    assert "--image_size 64" in refusal(good, image_size=64)

    incomplete = tmp_path / "incomplete"
    shutil.copytree(good, incomplete)
    (incomplete / MANIFEST).unlink()
    assert "not a complete pack" in refusal(incomplete)

    old = tmp_path / "old"
    shutil.copytree(good, old)
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "format": "umd_lightning.pack/0"}))
    assert "re-pack with this version" in refusal(old)

    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    chunk = next((cut / "train").glob("chunk-*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    assert f"{chunk} has 100 bytes" in refusal(cut)

    data = PackedPretrainDataModule(str(good), image_size=32, batch_size=2, num_workers=0)
    with pytest.raises(ConfigError, match=r"has no val split .* re-pack with umd data pack --split including val"):
        data.setup("fit")


class RecordBatches(pl.LightningModule):
    """Records, per step, the pairs of the batch and checksums of its pixels and masked tokens; each rank writes
    them to ``<out>/<name>_rank<r>.json`` at the end of the fit."""

    def __init__(self, out: str, name: str, stop_at: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out, self.name, self.stop_at = out, name, stop_at
        self.seen: list[list[Any]] = []
        self.validated: list[list[str]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pixels = float(batch["pixel_values"].double().sum())
        self.seen.append([list(zip(batch["ids"], batch["texts"])), pixels, batch["mlm_input_ids"].tolist()])
        return (self.weight * batch["pixel_values"].mean()).sum()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.stop_at is not None and self.trainer.global_step == self.stop_at:
            self.trainer.save_checkpoint(Path(self.out) / "stopped.ckpt")
            self.trainer.should_stop = True

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.validated.append([f"{i}|{t}" for i, t in zip(batch["ids"], batch["texts"])])

    def on_fit_end(self) -> None:
        record = {"train": self.seen, "val": self.validated}
        (Path(self.out) / f"{self.name}_rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(model: RecordBatches, data: PackedPretrainDataModule, ckpt_path: str | None = None, **options: Any) -> None:
    # Validation runs (limit_val_batches=1.0, Lightning's default): the DDP test reads the ranks' val batches.
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1.0, **options)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)


@pytest.fixture
def synthetic_pack(tmp_path: Path) -> Path:
    source = [{"format": "jsonl", "root": str(synthetic_jsonl(tmp_path / "src"))}]
    pack(str(write_config(tmp_path / "pretrain.yaml", source)), tmp_path / "pack", splits=["train", "val"])
    return tmp_path / "pack"


def packed_data(pack_dir: Path) -> PackedPretrainDataModule:
    return PackedPretrainDataModule(str(pack_dir), image_size=32, batch_size=2, num_workers=0, seed=11)


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_pairs_covering_the_split(synthetic_pack: Path, tmp_path: Path) -> None:
    fit(RecordBatches(str(tmp_path), "ddp"), packed_data(synthetic_pack), devices=2, strategy="ddp_spawn")
    ranks = [json.loads((tmp_path / f"ddp_rank{rank}.json").read_text()) for rank in (0, 1)]
    train = [[f"{i}|{t}" for step in rank["train"] for i, t in step[0]] for rank in ranks]
    val = [[pair for batch in rank["val"] for pair in batch] for rank in ranks]
    manifest = open_pack(synthetic_pack)
    assert len(train[0]) == len(train[1]) == manifest.splits["train"].pairs // 2 == 12  # 24 pairs, none dropped
    assert not set(train[0]) & set(train[1]) and len(set(train[0]) | set(train[1])) == 24
    # Validation is dealt without padding: 6 pairs, 3 per rank, each once.
    assert sorted(val[0] + val[1]) == sorted(set(val[0]) | set(val[1])) and len(val[0] + val[1]) == 6
    assert len(val[0]) == len(val[1]) == 3


@pytest.mark.slow
def test_stopped_fit_resumes_without_repeating_or_skipping(synthetic_pack: Path, tmp_path: Path) -> None:
    fit(RecordBatches(str(tmp_path), "whole"), packed_data(synthetic_pack))
    fit(RecordBatches(str(tmp_path), "first", stop_at=5), packed_data(synthetic_pack))
    fit(RecordBatches(str(tmp_path), "rest"), packed_data(synthetic_pack), ckpt_path=str(tmp_path / "stopped.ckpt"))
    whole, first, rest = (
        json.loads((tmp_path / f"{n}_rank0.json").read_text())["train"] for n in ("whole", "first", "rest")
    )
    assert len(whole) == 12 and len(first) == 5 and len(rest) == 7
    # The same pairs, pixels (crops) and masks at every step.
    assert first + rest == whole


@pytest.mark.slow
def test_umd_fit_trains_on_a_pack(synthetic_pack: Path, tmp_path: Path) -> None:
    from umd_lightning.cli import main

    config = {
        "seed_everything": 0,
        "model": {"class_path": "umd_lightning.stages.MRPretrain", "init_args": {"preset": "tiny", "lr": 1e-3}},
        "trainer": {
            "max_steps": 2,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        },
    }
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    stage, data = str(tmp_path / "stage.yaml"), str(synthetic_pack / "data.yaml")
    main(["fit", "--config", stage, "--config", data, "--run_dir", str(run)])
    assert (run / "last.ckpt").is_file()


@pytest.mark.slow
def test_throughput_benchmark_runs_on_the_fixtures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from data_throughput import main as benchmark
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    config = write_config(tmp_path / "pretrain.yaml", FIXTURE_SOURCES)
    options = ["--config", str(config), "--batch_size", "2", "--batches", "2", "--repeats", "1", "--workers", "0,1"]
    rows = benchmark([*options, "--full_size", "8", "--full_size_px", "64x80"])
    assert [(row["path"], row["workers"]) for row in rows] == [("raw", 0), ("packed", 0), ("raw", 1), ("packed", 1)] * 2
    assert all(row["samples"] == 4 and row["samples_per_s"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "needs 137 samples/s (base, TF32) or 93 (bf16)" in printed and "as 64x80 JPEG" in printed
