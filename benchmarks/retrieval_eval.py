"""Retrieval evaluation: exhaustive cross-encoder scoring against ITC top-k re-scoring, time and R@1/5/10.

    python benchmarks/retrieval_eval.py [--checkpoint FILE] [--pairs 200,2050] [--ks 16,32,64,128] [--repeats 2]

Fine-tunes a ``tiny``-preset retrieval model with the ITC head (``itc_weight``) on MedPix 2.0's training split
(1,653 pairs, 32 px images, captions of at most 32 tokens; random towers, trained from scratch) or loads it
from ``--checkpoint``, then runs ``Trainer.test`` on each evaluation set once per protocol: ``exhaustive``
(every pair through the cross-encoder, the paper's protocol) and ``topk`` for each ``k``. Each run is timed whole
(images read, captions embedded, the ITC pass, the fusion passes, recall). The protocols are interleaved and
repeated (forward, then backward order), and each one's time is the mean of its repeats, so that a machine whose
load drifts slows them alike; the speed-up is the exhaustive mean over the protocol's.

Evaluation sets: a size up to the test split's takes that many test pairs (MedPix: its 200 test pairs); a larger
one takes pairs from all splits (MedPix: ``2050`` is every pair, **the 1,653 training pairs included**, so its
recall is higher than held-out recall would be; what it measures is the time and how far top-k is from
exhaustive). Pairs are picked as the DataModule picks evaluation pairs (a seeded shuffle, ``split_seed`` 0).

The table: pairs, protocol, k, seconds, pairs fused by the cross-encoder, R@1/5/10 image-to-text and
text-to-image (%), the largest |R@K - exhaustive R@K| in points, the signed range of R@K - exhaustive R@K, and
the speed-up; a last row per set ranks by the ITC cosine alone (no cross-encoder), the ranker top-k draws its
candidates from. Top-k can beat exhaustive scoring: a true caption among the candidates is ranked against the
candidates only, so the cross-encoder's false positives outside them cannot push it down; one outside them is
missed. Nothing is written except the checkpoint when ``--checkpoint`` names a missing file.

Cost with the defaults on 2 quiet CPU cores (``--threads 2``; one thread on busy ones roughly doubles it): about
18 min of training (3,000 steps), then per repeat about 7 min for exhaustive scoring at 2,050 pairs (4.2 M fusion
passes) and about 2 min for the rest; about 40 min in all. ``--dataset roco --root DIR`` runs it on a ROCO-layout
folder (the smoke test uses a synthetic one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from umd_lightning.data import RetrievalDataModule
from umd_lightning.data.retrieval import select_eval_pairs
from umd_lightning.metrics.retrieval import recall_at_k
from umd_lightning.quiet import silence_known_noise
from umd_lightning.stages import FineTune

REPO = Path(__file__).resolve().parents[1]
MEDPIX = REPO / ".." / "shared" / "data" / "medpix_2_0" / "MedPix-2-0"
KS = ("1", "5", "10")


def make_data(args: argparse.Namespace) -> RetrievalDataModule:
    return RetrievalDataModule(
        dataset=args.dataset,
        root=str(args.root),
        tokenizer="minilm",
        image_size=args.image_size,
        max_text_length=args.max_text_length,
        batch_size=args.batch_size,
        num_candidates=args.num_candidates,
        num_workers=args.workers,
        max_eval_pairs=None,
        scan="none",
    )


def evaluation_data(args: argparse.Namespace, pairs: int) -> tuple[RetrievalDataModule, str]:
    """A DataModule whose test split is the evaluation set of ``pairs`` pairs, and where those pairs come from."""
    data = make_data(args)
    test = data.records["test"]
    if pairs <= len(test):
        data.records["test"] = select_eval_pairs(test, pairs, seed=0)
        return data, "test split"
    everything = [record for split in ("train", "val", "test") for record in data.records[split]]
    if pairs > len(everything):
        raise SystemExit(f"--pairs {pairs}: {args.root} holds {len(everything)} pairs in all")
    data.records["test"] = select_eval_pairs(everything, pairs, seed=0)
    chosen = {record.id for record in data.records["test"]}
    training = sum(record.id in chosen for record in data.records["train"])
    return data, f"all splits ({training} training pairs among them)"


def trainer(**options: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **options,
    )


def train_or_load(args: argparse.Namespace) -> FineTune:
    if args.checkpoint is not None and args.checkpoint.is_file():
        print(f"[bench] loading {args.checkpoint}")
        return FineTune.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=False)
    pl.seed_everything(args.seed, verbose=False)
    model = FineTune(
        preset=args.preset,
        itc_weight=args.itc_weight,
        lr=args.lr,
        lr_mult=1.0,
        head_lr_mult=1.0,
        warmup_ratio=0.05,
        text_chunk=args.text_chunk,
    )
    fit = trainer(max_steps=args.steps)
    started = time.perf_counter()
    fit.fit(model, datamodule=make_data(args))
    print(f"[bench] trained {args.steps} steps in {time.perf_counter() - started:.0f} s")
    if args.checkpoint is not None:
        fit.save_checkpoint(args.checkpoint)
        print(f"[bench] saved {args.checkpoint}")
    return model


def evaluate(model: FineTune, data: RetrievalDataModule, mode: str, k: int) -> dict[str, Any]:
    model.hparams.retrieval_eval, model.hparams.retrieval_top_k = mode, k
    started = time.perf_counter()
    metrics = trainer().test(model, datamodule=data, verbose=False)[0]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "metrics": metrics, "fused": model.evaluation_protocol()["pairs_cross_encoded"]}


@torch.inference_mode()
def evaluate_itc_only(model: FineTune, data: RetrievalDataModule) -> dict[str, Any]:
    """R@K of the ITC cosine alone (no cross-encoder): what the top-k candidates are drawn from."""
    started = time.perf_counter()
    data.setup("test")
    split = data.eval_split("test")
    _, ids, mask = data.eval_captions("test")
    chunk = model.hparams.text_chunk
    text = torch.cat(
        [
            model.itc_head.text_features(
                model.backbone.embed_text(ids[i : i + chunk], mask[i : i + chunk]), mask[i : i + chunk]
            )
            for i in range(0, ids.shape[0], chunk)
        ]
    )
    order, images = [], []
    for batch in data.eval_image_loader("test"):
        images.append(model.itc_head.image_features(model.backbone.embed_image(batch["pixel_values"])))
        order.append(batch["image_index"])
    similarity = torch.empty(len(split.image_captions), text.shape[0])
    similarity[torch.cat(order)] = torch.cat(images) @ text.T
    metrics = recall_at_k(similarity, list(split.image_captions), list(split.captions))
    return {
        "seconds": time.perf_counter() - started,
        "metrics": {f"test/{k}": v for k, v in metrics.items()},
        "fused": 0,
    }


def recall(metrics: dict[str, float], direction: str) -> list[float]:
    return [100 * metrics[f"test/{direction}_r{k}"] for k in KS]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("medpix", "roco"), default="medpix")
    parser.add_argument("--root", type=Path, default=MEDPIX, help="the data set's folder")
    parser.add_argument("--pairs", default="200,2050", help="evaluation set sizes, comma-separated")
    parser.add_argument("--ks", default="16,32,64,128", help="top-k values, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per protocol (interleaved)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="load this model, or save the trained one here")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-text-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=16, help="captions per training image")
    parser.add_argument("--itc-weight", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3, help="one learning rate for every parameter")
    parser.add_argument("--text-chunk", type=int, default=256, help="pairs per fusion pass")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    silence_known_noise()
    # The thread count and Lightning's log level are put back afterwards: the tests call main() in-process.
    lightning_logger = logging.getLogger("lightning.pytorch")
    threads, level = torch.get_num_threads(), lightning_logger.level
    torch.set_num_threads(args.threads)
    lightning_logger.setLevel(logging.WARNING)  # a Trainer per run: no device lines
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)
        lightning_logger.setLevel(level)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(p) for p in args.pairs.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    print(f"[bench] {' '.join(sys.argv)}")

    model = train_or_load(args)
    model.eval()
    protocols = [("exhaustive", 0), *(("topk", k) for k in ks), ("itc only", 0)]
    rows: list[dict[str, Any]] = []
    for size in sizes:
        data, source = evaluation_data(args, size)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {p: [] for p in protocols}
        for repeat in range(args.repeats):
            for protocol in protocols if repeat % 2 == 0 else protocols[::-1]:
                run = evaluate_itc_only(model, data) if protocol[0] == "itc only" else evaluate(model, data, *protocol)
                runs[protocol].append(run)
                print(f"[bench] {size} pairs, {protocol[0]} k={protocol[1]}: {run['seconds']:.1f} s", flush=True)
        exhaustive = runs["exhaustive", 0]
        base_seconds = sum(r["seconds"] for r in exhaustive) / len(exhaustive)
        base = recall(exhaustive[0]["metrics"], "i2t") + recall(exhaustive[0]["metrics"], "t2i")
        for protocol in protocols:
            seconds = [r["seconds"] for r in runs[protocol]]
            metrics = runs[protocol][0]["metrics"]
            values = recall(metrics, "i2t") + recall(metrics, "t2i")
            deltas = [a - b for a, b in zip(values, base)]
            rows.append(
                {
                    "pairs": size,
                    "source": source,
                    "mode": protocol[0],
                    "k": protocol[1] or None,
                    "seconds": sum(seconds) / len(seconds),
                    "each": seconds,
                    "fused": runs[protocol][0]["fused"],
                    "recall": values,
                    "max_delta": max(abs(d) for d in deltas),
                    "delta_range": (min(deltas), max(deltas)),
                    "speedup": base_seconds / (sum(seconds) / len(seconds)),
                }
            )
    print_table(rows, args)
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.dataset}, preset {args.preset}, {args.image_size} px, {args.steps} training steps, "
        f"{args.threads} thread(s), mean of {args.repeats} interleaved run(s)"
    )
    header = (
        f"{'pairs':>5}  {'mode':<10} {'k':>4} {'seconds':>8} {'fused':>9}  "
        f"{'i2t R@1/5/10':>17}  {'t2i R@1/5/10':>17}  {'max|dR|':>7} {'dR from..to':>13} {'speed-up':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        i2t = "/".join(f"{v:.1f}" for v in row["recall"][:3])
        t2i = "/".join(f"{v:.1f}" for v in row["recall"][3:])
        low, high = row["delta_range"]
        print(
            f"{row['pairs']:>5}  {row['mode']:<10} {row['k'] or '-':>4} {row['seconds']:>8.1f} {row['fused']:>9}  "
            f"{i2t:>17}  {t2i:>17}  {row['max_delta']:>7.2f} {low:>+6.1f}..{high:<+5.1f} {row['speedup']:>7.1f}x"
        )
    for size, source in dict((row["pairs"], row["source"]) for row in rows).items():
        print(f"{size} pairs: {source}")


if __name__ == "__main__":
    main()
