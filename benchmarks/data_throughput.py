"""Samples/s of the pre-training input pipeline, raw files against a pack, beside the GPU step rate it must feed.

    python benchmarks/data_throughput.py [--config configs/pretrain/medpix.yaml] [--workers 0,1,2] [--full_size 256]

Each row iterates the training loader of a real DataModule for ``--batches`` batches after one warm-up batch
(which includes starting the workers): ``PretrainDataModule`` on the config's sources (decode the file, the
training transform's resize and crop, collate: tokenise and mask), then ``PackedPretrainDataModule`` on a pack of
the same sources (decode a PNG of the pre-resized image, the same crop, the same collate). The pack is written
first with ``umd data pack`` into a temporary folder (or pass ``--pack DIR``); its writing time is printed too.

``--full_size N`` adds the case the issue is about: N of the config's training images re-encoded as MIMIC-CXR-JPG
sized JPEGs (``--full_size_px``, 2544 x 3056 by default, quality 95) in a JSONL source, so the raw rows pay for
decoding and resizing full-size files as MIMIC-CXR pre-training would; MedPix itself ships images of about
300 x 350 px, which are cheap to decode.

Each row is the median of ``--repeats`` timings. The main process runs with ``--threads`` torch intra-op threads
(1 by default, as DataLoader workers always do): on a loaded machine two threads per process make the
``workers=0`` rows several times slower, which measures the contention rather than the pipeline.

The GPU figure the pipeline is compared with was measured on an H200: 234 ms per ``base`` MR-Pretrain step at
batch 32 in TF32 and 343 ms in bf16, i.e. 137 and 93 samples/s per GPU. The load average is printed: on a machine
shared with another job the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from umd_lightning.data import PackedPretrainDataModule, PretrainDataModule
from umd_lightning.data.check import read_data_section, with_overrides
from umd_lightning.data.pack import pack

GPU_STEP_MS = {"TF32": 234.0, "bf16": 343.0}
"""``base`` MR-Pretrain step at batch 32 on one H200 (an earlier measurement)."""
GPU_BATCH = 32


def throughput(loader: DataLoader, batches: int) -> tuple[float, int]:
    """Samples/s over ``batches`` batches after a warm-up batch, and the samples counted."""
    loader.sampler.set_epoch(0)  # type: ignore[union-attr]
    iterator = iter(loader)
    next(iterator)
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        samples += len(batch["ids"])
    elapsed = time.perf_counter() - start
    del iterator
    return (samples / elapsed if elapsed > 0 else float("nan")), samples


def full_size_source(config_data: dict, out: Path, count: int, size: tuple[int, int]) -> dict:
    """``count`` training images of the config's sources re-encoded at ``size`` (width, height) as JPEG, with their
    texts, as a JSONL source; the data section that reads it."""
    datamodule = PretrainDataModule(**{**config_data["init_args"], "scan": "none", "on_error": "raise"})
    datamodule.setup("fit")
    dataset = datamodule.train_dataset
    out.mkdir(parents=True)
    lines = []
    for source in dataset.datasets:  # type: ignore[union-attr]
        for record in source.images:
            if len(lines) == count:
                break
            name = f"{len(lines):05d}.jpg"
            with Image.open(record.image) as image:
                image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out / name, quality=95)
            lines.append(json.dumps({"image": name, "text": list(record.texts), "split": "train", "id": record.id}))
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    init_args = {**config_data["init_args"], "sources": [{"format": "jsonl", "root": str(out / "data.jsonl")}]}
    return {"class_path": config_data["class_path"], "init_args": init_args}


def run_rows(
    name: str,
    data: dict,
    pack_dir: Path,
    workers: list[int],
    batches: int,
    repeats: int,
    encoding: str,
    config_path: Path,
) -> list[dict]:
    """Pack ``data`` into ``pack_dir`` and time raw and packed loaders for every worker count."""
    config_path.write_text(yaml.safe_dump({"data": data}))
    start = time.perf_counter()
    manifest = pack(str(config_path), pack_dir, encoding=encoding, workers=max(workers), splits=["train", "val"])  # type: ignore[arg-type]
    pack_s = time.perf_counter() - start
    train = manifest.splits["train"]
    print(
        f"[{name}] packed {train.records} images / {train.pairs} pairs in {pack_s:.1f} s with {max(workers)} "
        f"worker(s): {train.bytes / 1e6:.1f} MB ({manifest.image_size} px, {manifest.encoding})"
    )
    init = data["init_args"]
    options = {
        key: init[key]
        for key in ("tokenizer", "image_size", "max_text_length", "mask_ratio_text", "batch_size", "seed")
        if key in init
    }
    rows = []
    for count in workers:
        for path in ("raw", "packed"):
            if path == "raw":
                datamodule = PretrainDataModule(**{**init, "num_workers": count, "scan": "header"})
            else:
                datamodule = PackedPretrainDataModule(str(pack_dir), **{**options, "num_workers": count})
            datamodule.setup("fit")
            loader = datamodule.train_dataloader()
            timings = [throughput(loader, batches) for _ in range(repeats)]
            rate, samples = statistics.median(rate for rate, _ in timings), timings[0][1]
            rows.append({"data": name, "path": path, "workers": count, "samples_per_s": rate, "samples": samples})
            each = ", ".join(f"{r:.1f}" for r, _ in timings)
            print(
                f"[{name}] {path:6s} workers={count}: {rate:7.1f} samples/s ({each}; {samples} samples each)",
                flush=True,
            )
    return rows


def print_table(rows: list[dict], batch_size: int) -> None:
    need = {precision: GPU_BATCH / (ms / 1000) for precision, ms in GPU_STEP_MS.items()}
    print(
        f"\nbatch {batch_size}; one H200 needs {need['TF32']:.0f} samples/s (base, TF32) or {need['bf16']:.0f} "
        "(bf16) per GPU"
    )
    print(f"{'data':24s} {'path':7s} {'workers':>7s} {'samples/s':>10s} {'x TF32 need':>12s}")
    for row in rows:
        share = row["samples_per_s"] / need["TF32"]
        print(f"{row['data']:24s} {row['path']:7s} {row['workers']:7d} {row['samples_per_s']:10.1f} {share:12.2f}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pretrain/medpix.yaml", help="a pre-training config")
    parser.add_argument("--image_size", type=int, default=None, help="default: the config's (288 for medpix)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per row, after one warm-up batch")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--repeats", type=int, default=3, help="timings per row (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    parser.add_argument("--tokenizer", default="minilm", help="the collate's tokenizer (the config's needs a hub)")
    parser.add_argument("--encoding", default="png", choices=("png", "raw", "jpeg"))
    parser.add_argument("--full_size", type=int, default=256, help="images of the full-size JPEG case (0: none)")
    parser.add_argument("--full_size_px", default="2544x3056", help="their width x height")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()  # put back afterwards: the tests call main() in-process
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> list[dict]:
    workers = [int(part) for part in args.workers.split(",")]
    overrides = [f"--data.init_args.tokenizer={args.tokenizer}", f"--data.init_args.batch_size={args.batch_size}"]
    if args.image_size is not None:
        overrides.append(f"--data.init_args.image_size={args.image_size}")
    data = with_overrides(read_data_section(args.config), overrides)
    data = json.loads(json.dumps(data, default=str))
    print(
        f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
        f"{args.threads} torch thread(s) in the main process"
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="umd_throughput_") as tmp:
        work = Path(tmp)
        name = Path(args.config).stem
        rows += run_rows(
            name, data, work / "pack", workers, args.batches, args.repeats, args.encoding, work / "config.yaml"
        )
        if args.full_size:
            width, height = (int(x) for x in args.full_size_px.lower().split("x"))
            full = full_size_source(data, work / "full_size", args.full_size, (width, height))
            label = f"{name} as {width}x{height} JPEG"
            rows += run_rows(
                label, full, work / "pack_full", workers, args.batches, args.repeats, args.encoding, work / "full.yaml"
            )
    print_table(rows, args.batch_size)
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


if __name__ == "__main__":
    main()
