"""Precision and distribution: MR-Pretrain and fine-tuning (VQA with GM-Coord) under bf16-mixed on CPU and under
2-process DDP on CPU (gloo), and the NaN guard that stops a run naming the step and the loss term."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from pipeline_helpers import quiet_trainer
from torch._dynamo.utils import counters

from umd_lightning.callbacks import GMCoord
from umd_lightning.data import PretrainDataModule, VQADataModule
from umd_lightning.stages import FineTune, MRPretrain, NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


class Recorder(pl.Callback):
    """Keeps every training loss; with ``out_dir``, each rank saves its losses and full state dict (parameters,
    buffers, EMA teacher) to ``out_dir/rank{r}.pt`` when training ends."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is not None:
            state = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
            frames = counters["frames"]["ok"]  # how many frames torch.compile compiled in this process
            saved = {"state": state, "losses": self.losses, "compiled_frames": frames}
            torch.save(saved, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class PoisonPixels(pl.Callback):
    """Sets the pixels of the batch at ``batch_idx`` to NaN, as a corrupt image would."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch: dict[str, Any], batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            batch["pixel_values"].fill_(float("nan"))


def pretrain_setup(**options: Any) -> tuple[MRPretrain, PretrainDataModule, list[pl.Callback]]:
    data = PretrainDataModule(
        sources=[{"format": "roco", "root": str(REPO / "tests/data/roco")}],
        image_size=32,
        batch_size=2,
        num_workers=0,
        scan="none",
    )
    return MRPretrain(preset="tiny", lr=1e-3, **options), data, []


def finetune_setup(**options: Any) -> tuple[FineTune, VQADataModule, list[pl.Callback]]:
    data = VQADataModule(
        dataset="vqa_rad",
        root=str(REPO / "tests/data/vqa_rad"),
        image_size=32,
        batch_size=4,
        num_workers=0,
        scan="none",
    )
    return FineTune(preset="tiny", lr=1e-3, **options), data, [GMCoord(alpha=0.5, noise=True)]


SETUPS = {"pretrain": pretrain_setup, "finetune": finetune_setup}


def fit(stage: str, callbacks: list[pl.Callback], options: dict | None = None, **trainer_kwargs: Any) -> None:
    pl.seed_everything(0)
    model, data, stage_callbacks = SETUPS[stage](**(options or {}))
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[*stage_callbacks, *callbacks], **trainer_kwargs)
    trainer.fit(model, datamodule=data)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bf16_mixed_on_cpu_gives_finite_losses(stage: str) -> None:
    recorder = Recorder()
    fit(stage, [recorder], devices=1, precision="bf16-mixed")
    assert len(recorder.losses) == STEPS
    assert all(math.isfinite(loss) and loss > 0 for loss in recorder.losses), recorder.losses


# The speed options under DDP: compiled parts (with dynamo's "eager" backend: the same graphs as Inductor's input,
# without Inductor's minutes of compiling in each process) and recomputed activations.
SPEED_OPTIONS = {"compile": "eager", "gradient_checkpointing": True}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "options"),
    [("pretrain", {}), ("finetune", {}), ("pretrain", SPEED_OPTIONS), ("finetune", SPEED_OPTIONS)],
    ids=["pretrain", "finetune", "pretrain-compile-checkpointing", "finetune-compile-checkpointing"],
)
def test_ddp_ranks_end_identical(stage: str, options: dict, tmp_path: Path) -> None:
    fit(stage, [Recorder(str(tmp_path))], options, devices=2, strategy="ddp_spawn")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for rank in (rank0, rank1):
        assert len(rank["losses"]) == STEPS and all(math.isfinite(loss) for loss in rank["losses"])
        # compiled: at least the towers and fusion (and, pre-training, the teacher's and the MIM decoder)
        frames = rank["compiled_frames"]
        if options:
            assert frames >= (7 if stage == "pretrain" else 3), frames
        else:
            assert frames == 0, frames
    # The ranks trained on different halves of the data...
    assert rank0["losses"] != rank1["losses"]
    # ...yet every parameter, buffer and EMA-teacher weight is bitwise the same.
    assert rank0["state"].keys() == rank1["state"].keys()
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
    if stage == "pretrain":
        assert any(name.startswith("teacher.") for name in rank0["state"])


def test_nan_loss_stops_the_run_naming_step_and_term() -> None:
    with pytest.raises(NonFiniteLossError, match=r"loss term 'mim' is nan at global step 1 \(epoch 0\)"):
        fit("pretrain", [PoisonPixels(batch_idx=1)], devices=1)
