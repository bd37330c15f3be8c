"""The README's main job on its embedded default: the whole UMD chain on synthetic data, on the CPU.

``python -m umd_lightning.demo [--out runs/demo]`` writes seeded synthetic data sets in the ROCO and VQA-RAD
layouts, then runs MR-Pretrain -> TD-Calib -> fine-tuning for VQA with GM-Coord -> test with the ``small`` preset
(``umd_lightning/configs/demo/*.yaml``, shipped in the package; each stage starts from the previous one's
checkpoint through ``pretrained``), and prints the loss of each stage, the GM-Coord coefficients seen and the test
table (open / closed / overall). Every stage trains a fixed number of steps, so the table depends only on the seed;
each stage's ``max_time`` is a safety net only, and a stage stopped by it says so in its line and in the table's
title. It ends by exporting the fine-tuned model and printing how to serve and explain it.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
import warnings
from pathlib import Path

from lightning.pytorch import Trainer

from umd_lightning.callbacks.recorder import StepRecorder
from umd_lightning.cli import build_cli
from umd_lightning.data.synthetic import generate
from umd_lightning.export import export_model
from umd_lightning.quiet import known_warnings

CONFIGS = Path(__file__).resolve().parent / "configs" / "demo"
"""The demo's stage configs, shipped inside the package (package data)."""


def window_mean(values: list[float], first: bool, size: int) -> float:
    window = values[:size] if first else values[-size:]
    return sum(window) / max(1, len(window))


SMOKE = [
    "--model.init_args.preset", "tiny",
    "--data.init_args.image_size", "32",
    "--trainer.max_steps", "3",
    "--trainer.max_epochs", "1",
    "--trainer.val_check_interval", "3",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
"""``--smoke``: the same chain on the ``tiny`` preset for a few steps per stage (what the test suite runs)."""


def run_stage(name: str, out: Path, overrides: list[str]) -> tuple[StepRecorder, Trainer, object]:
    config = CONFIGS / f"{name}.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} not found: the umd_lightning installation lacks its package data; reinstall it"
        )
    args = [  # no subcommand: with run=False LightningCLI only parses and instantiates
        "--config", str(config),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--checkpoint.dirpath", str(out / name / "checkpoints"),
        *overrides,
    ]  # fmt: skip
    with warnings.catch_warnings():  # the demo's own options are in sys.argv, by design
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = build_cli(args, run=False)
    recorder = StepRecorder()
    cli.trainer.callbacks.append(recorder)
    started = time.time()
    with known_warnings():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = recorder.losses
    size = max(1, min(10, len(losses) // 5))
    planned = cli.trainer.max_steps
    capped = 0 < cli.trainer.global_step < planned
    note = f" (STOPPED by the max_time safety cap after {cli.trainer.global_step} of {planned} steps)" if capped else ""
    print(
        f"[demo] {name}: {len(losses)} steps in {time.time() - started:.0f} s, training loss "
        f"{window_mean(losses, True, size):.3f} (first {size} steps) -> {window_mean(losses, False, size):.3f} "
        f"(last {size}){note}"
    )
    recorder.capped = capped
    return recorder, cli.trainer, cli


def keep_checkpoint(trainer: Trainer, target: Path) -> Path:
    """Copy the stage's best (else last) checkpoint to a fixed name the next stage's config points at."""
    callback = trainer.checkpoint_callback
    source = callback.best_model_path or callback.last_model_path
    shutil.copyfile(source, target)
    return target


def print_table(results: dict[str, float], leak_notes: list[str], preset: str, capped: list[str]) -> None:
    def cell(key: str) -> str:
        value = results.get(f"test/{key}", math.nan)
        return "  n/a " if math.isnan(value) else f"{100 * value:5.1f}%"

    counts = {key: int(results.get(f"test/{key}", 0)) for key in ("n_open", "n_closed", "n", "n_outside_vocab")}
    cap = f"; NOT the fixed-step result: {', '.join(capped)} stopped by the time cap" if capped else ""
    print(f"\n[demo] VQA test results (synthetic VQA-RAD, {preset} preset, MR-Pretrain -> TD-Calib -> GM-Coord{cap})")
    print("        | open   | closed | overall")
    print(f"  acc   | {cell('open')} | {cell('closed')} | {cell('overall')}")
    print(f"  n     | {counts['n_open']:6d} | {counts['n_closed']:6d} | {counts['n']:7d}")
    print(f"  {counts['n_outside_vocab']} test answers are outside the training vocabulary and count as wrong")
    clean = "no leak (train vocabulary, held-out validation)"
    print(f"  evaluation: {'LEAKY: ' + '; '.join(leak_notes) if leak_notes else clean}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for data, logs and checkpoints")
    parser.add_argument("--images", type=int, default=400, help="synthetic images per layout")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, a few steps per stage (for tests)")
    args = parser.parse_args(argv)
    extra = SMOKE if args.smoke else []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out: Path = args.out
    started = time.time()
    roots = generate(
        out / "data", layouts=["roco", "vqa_rad"], n_images=args.images, image_size=160, seed=0, overwrite=True
    )
    print(f"[demo] synthetic data in {out / 'data'}: {', '.join(sorted(roots))} ({time.time() - started:.1f} s)")

    data = out / "data"
    sources = f'[{{"format": "roco", "root": "{data / "roco"}"}}]'
    capped: list[str] = []
    recorder, trainer, _ = run_stage("pretrain", out, ["--data.init_args.sources", sources, *extra])
    capped += ["pretrain"] if recorder.capped else []
    pretrained = keep_checkpoint(trainer, out / "pretrain.ckpt")
    downstream = ["--data.init_args.root", str(data / "vqa_rad"), *extra]
    recorder, trainer, _ = run_stage("calib", out, ["--model.init_args.pretrained", str(pretrained), *downstream])
    capped += ["calib"] if recorder.capped else []
    calibrated = keep_checkpoint(trainer, out / "calib.ckpt")
    recorder, trainer, cli = run_stage("finetune", out, ["--model.init_args.pretrained", str(calibrated), *downstream])
    capped += ["finetune"] if recorder.capped else []
    with known_warnings():
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    results = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}

    k_t, k_v = recorder.coefficients["k_t"], recorder.coefficients["k_v"]
    if k_t:
        print(
            f"[demo] GM-Coord over {len(k_t)} steps: k_t in [{min(k_t):.3f}, {max(k_t):.3f}], "
            f"k_v in [{min(k_v):.3f}, {max(k_v):.3f}]"
        )
    print_table(results, list(cli.model.hparams.leak_notes or []), cli.model.hparams.preset, capped)
    best = trainer.checkpoint_callback.best_model_path
    exported = export_model(best, out / "export")
    print(f"\n[demo] done in {(time.time() - started) / 60:.1f} min; checkpoints: {out}/*.ckpt and {best}")
    print(f"[demo] TensorBoard logs: tensorboard --logdir {out}")
    image = next(iter(sorted((data / "vqa_rad" / "VQA_RAD Image Folder").glob("*.jpg"))), "scan.jpg")
    print(f"[demo] the fine-tuned model, exported to {exported}:")
    print(f"  serve it:   umd serve {exported}    (then open http://127.0.0.1:7860)")
    print(
        f'  explain:    python -c "from umd_lightning.predict import Predictor; '
        f"e = Predictor.from_export('{exported}').explain('{image}', 'where is the circle?'); "
        f"print(e.answer, e.top); e.save('{out / 'explanations'}', 'example')\""
    )


if __name__ == "__main__":
    main()
