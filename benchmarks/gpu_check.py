"""GPU checks in one run (for a lent CUDA machine): bf16 pre-training step times, a bf16-mixed Lightning fit, and
VQA-RAD fine-tuning of the ``small`` preset with and without GM-Coord.

    python benchmarks/gpu_check.py --text-model PATH --vqa-rad PATH --out DIR [--epochs 15 --seeds 0]

``--text-model`` is a local HF folder (the MiniLM tower), ``--vqa-rad`` the official VQA-RAD release folder. The
fine-tuning runs use the train answer vocabulary and a seeded held-out 10% of training images for validation; the
test set is evaluated once, on the best validation checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import measure

from umd_lightning.callbacks import GMCoord
from umd_lightning.callbacks.recorder import StepRecorder
from umd_lightning.data import PretrainDataModule, SourceSpec, VQADataModule
from umd_lightning.data.synthetic import generate
from umd_lightning.stages import FineTune, MRPretrain

ACCELERATOR = {"name": "gpu", "precision": "bf16-mixed", "fit_steps": 40, "limit": 1.0}
"""``--dry-run`` switches these to a few CPU batches, to check the script before spending device time."""


def step_times(dry_run: bool = False) -> list[dict]:
    """The issue's GPU step figures (benchmarks/step.py, each in its own process): `base` at 288 px, batch 32,
    TF32 vs bf16-mixed, bf16 with gradient checkpointing, `small` at batch 32 too, then `base` bf16 compiled.
    ``dry_run``: every row on the CPU with `tiny`, batch 2, one timed step (the script checked, nothing timed)."""
    device, batch, repeats, warmup = ("cpu", 2, 1, 1) if dry_run else ("cuda", 32, 10, 3)
    rows = [
        ("base", "fp32", {}),
        ("base", "bf16", {}),
        ("base", "bf16", {"gradient_checkpointing": True}),
        ("small", "fp32", {}),
        ("small", "bf16", {}),
        # Last: compiling every part of `base` (towers, fusion, teacher, decoder; forward and backward) takes
        # minutes, and the rows above are printed as they come.
        ("base", "bf16", {"compile": True}),
    ]
    results = []
    print(
        f"{'preset':6s} {'precision':9s} {'option':22s} {'ms/step':>8s} {'pairs/s':>8s} {'MFU':>6s} {'GiB':>6s} "
        f"{'saved GiB':>9s}"
    )
    for preset, precision, options in rows:
        preset = "tiny" if dry_run else preset
        size = 288 if preset == "base" else None
        r = measure(
            preset, precision, batch=batch, repeats=repeats, warmup=warmup, device=device, image_size=size, **options
        )
        r["options"] = options
        label = ", ".join(options) or "-"
        shown = "TF32" if precision == "fp32" else "bf16-mixed"
        print(
            f"{preset:6s} {shown:9s} {label:22s} {r['step_median_s'] * 1000:8.0f} {batch / r['step_median_s']:8.0f} "
            f"{100 * r['mfu']:5.1f}% {r['memory_mib'] / 1024:6.1f} {r['saved_for_backward_mib'] / 1024:9.2f}",
            flush=True,
        )
        results.append(r)
    return results


def lightning_bf16_fit(out: Path, text_model: str) -> dict:
    roots = generate(out / "synthetic", layouts=["roco"], n_images=200, image_size=160, seed=0, overwrite=True)
    data = PretrainDataModule(
        sources=[SourceSpec(format="roco", root=str(roots["roco"]))],
        tokenizer=text_model,
        image_size=128,
        batch_size=32,
        num_workers=4,
    )
    model = MRPretrain(preset="small", text_model=text_model, image_size=128, lr=1e-4)
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator=ACCELERATOR["name"],
        devices=1,
        precision=ACCELERATOR["precision"],
        max_steps=ACCELERATOR["fit_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[recorder],
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    losses = recorder.losses
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    print(
        f"[bf16 fit] MR-Pretrain small, bf16-mixed, {len(losses)} steps: loss {losses[0]:.3f} -> "
        f"{sum(losses[-5:]) / 5:.3f}, all finite: {finite}",
        flush=True,
    )
    return {"steps": len(losses), "first": losses[0], "last5": sum(losses[-5:]) / 5, "finite": finite}


def finetune_vqa_rad(out: Path, text_model: str, root: str, gm_coord: bool, seed: int, epochs: int) -> dict:
    pl.seed_everything(seed, workers=True)
    data = VQADataModule(
        dataset="vqa_rad", root=root, tokenizer=text_model, image_size=128, batch_size=32, num_workers=6, seed=0
    )
    model = FineTune(
        preset="small",
        text_model=text_model,
        image_size=128,
        task="vqa",
        num_outputs=data.num_outputs,
        labels=data.labels,
        lr=5e-5,
        lr_mult=5.0,
        head_lr_mult=10.0,
        schedule="cosine",
        warmup_ratio=0.1,
    )
    name = f"{'gm' if gm_coord else 'plain'}_seed{seed}"
    checkpoint = ModelCheckpoint(dirpath=out / name, monitor="val/overall", mode="max", save_top_k=1)
    recorder = StepRecorder()
    callbacks = [checkpoint, recorder] + ([GMCoord(alpha=0.1, noise=True)] if gm_coord else [])
    trainer = pl.Trainer(
        accelerator=ACCELERATOR["name"],
        devices=1,
        precision=ACCELERATOR["precision"],
        max_epochs=epochs,
        limit_train_batches=ACCELERATOR["limit"],
        limit_val_batches=ACCELERATOR["limit"],
        logger=CSVLogger(out, name=name),
        callbacks=callbacks,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    started = time.time()
    trainer.fit(model, datamodule=data)
    fit_s = time.time() - started
    trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
    result = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    result.update(
        gm_coord=gm_coord,
        seed=seed,
        epochs=epochs,
        fit_s=fit_s,
        steps=trainer.global_step,
        best_val=float(checkpoint.best_model_score),
    )
    if gm_coord and recorder.coefficients["k_t"]:
        for key in ("k_t", "k_v"):
            values = recorder.coefficients[key]
            result[f"{key}_range"] = [min(values), max(values)]
            result[f"{key}_mean"] = sum(values) / len(values)
    print(
        f"[vqa-rad] {name}: open {result.get('open', 0):.3f} closed {result.get('closed', 0):.3f} overall "
        f"{result.get('overall', 0):.3f} (best val {result['best_val']:.3f}, {result['steps']} steps, "
        f"{fit_s:.0f} s) " + (f"k_t {result.get('k_t_range')} k_v {result.get('k_v_range')}" if gm_coord else ""),
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-model", required=True)
    parser.add_argument("--vqa-rad", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["steps", "fit", "vqa"])
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU, tiny and brief (nothing timed)")
    parser.add_argument("--accelerator", default="gpu", help="Lightning accelerator for the fits (cpu to compare)")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision for the fits")
    parser.add_argument("--variants", nargs="+", default=["plain", "gm"], choices=["plain", "gm"])
    args = parser.parse_args()
    ACCELERATOR.update(name=args.accelerator, precision=args.precision)
    if args.dry_run:
        ACCELERATOR.update(name="cpu", fit_steps=3, limit=2)
    torch.backends.cuda.matmul.allow_tf32 = True
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {where}", flush=True)
    report: dict = {}
    if "steps" not in args.skip:
        report["step_times"] = step_times(args.dry_run)
    if "fit" not in args.skip:
        report["bf16_fit"] = lightning_bf16_fit(args.out, args.text_model)
    if "vqa" not in args.skip:
        report["vqa_rad"] = [
            finetune_vqa_rad(args.out, args.text_model, args.vqa_rad, gm, seed, args.epochs)
            for seed in args.seeds
            for gm in (variant == "gm" for variant in args.variants)
        ]
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
