"""Resuming after a crash: a run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends with exactly the
weights of an uninterrupted run (EMA teacher and GM-Coord state included), and a crash while a checkpoint is
being written leaves the previous ``last.ckpt`` whole.

The runs go through ``python -m umd_lightning fit`` in subprocesses on the committed fixtures (and on a pack of the
pre-training one, which must resume the same way); the crash is a real ``SIGKILL`` sent by :class:`KillAtStep`
(imported by the subprocess from this file) right before a given optimiser step, so the work since the last
checkpoint is lost and must be redone identically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

from umd_lightning.checkpointing import AtomicCheckpointIO
from umd_lightning.data.sampler import ResumableDataLoader

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY, KILL_AT = 8, 2, 5
"""8 steps, a checkpoint every 2; killed before step 6 runs, so the resume starts from step 4 (mid-epoch: the
pre-training fixture gives 5 batches per epoch) and crosses into the next epoch."""


class KillAtStep(pl.Callback):
    """Test-only: the process SIGKILLs itself when ``global_step`` reaches ``step`` (before that batch runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def pretrain_config(root: Path) -> dict[str, Any]:
    return {
        "model": {"class_path": "umd_lightning.stages.MRPretrain", "init_args": {"preset": "tiny", "lr": 1e-3}},
        "data": {
            "class_path": "umd_lightning.data.PretrainDataModule",
            "init_args": {
                "sources": [{"format": "roco", "root": str(REPO / "tests/data/roco")}],
                "image_size": 32,
                "batch_size": 2,
                "num_workers": 0,
                "scan": "none",
            },
        },
    }


def packed_config(root: Path) -> dict[str, Any]:
    """MR-Pretrain on a pack of the same fixture (``umd data pack``, written once per test)."""
    from umd_lightning.data.pack import pack

    raw = pretrain_config(root)
    if not (root / "pack").is_dir():
        (root / "source.yaml").write_text(yaml.safe_dump({"data": raw["data"]}))
        pack(str(root / "source.yaml"), root / "pack")
    init_args = {"pack": str(root / "pack"), "image_size": 32, "batch_size": 2, "num_workers": 0}
    return {**raw, "data": {"class_path": "umd_lightning.data.PackedPretrainDataModule", "init_args": init_args}}


def finetune_config(root: Path) -> dict[str, Any]:
    return {
        "model": {"class_path": "umd_lightning.stages.FineTune", "init_args": {"preset": "tiny", "lr": 1e-3}},
        "data": {
            "class_path": "umd_lightning.data.VQADataModule",
            "init_args": {
                "dataset": "vqa_rad",
                "root": str(REPO / "tests/data/vqa_rad"),
                "image_size": 32,
                "batch_size": 8,
                "num_workers": 0,
                "scan": "none",
            },
        },
        "callbacks": [{"class_path": "umd_lightning.callbacks.GMCoord", "init_args": {"alpha": 0.5, "noise": True}}],
    }


def write_config(run_dir: Path, stage: dict[str, Any], kill_at: int | None) -> Path:
    callbacks = list(stage.get("callbacks", []))
    if kill_at is not None:
        callbacks.append({"class_path": "test_resume.KillAtStep", "init_args": {"step": kill_at}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(run_dir),
            "plugins": [{"class_path": "umd_lightning.checkpointing.AtomicCheckpointIO"}],
            "callbacks": callbacks,
        },
        "checkpoint": {"dirpath": str(run_dir / "ckpt"), "every_n_train_steps": EVERY, "save_last": True},
        "model": stage["model"],
        "data": stage["data"],
    }
    path = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def umd_fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "umd_lightning", "fit", "--config", str(config), *extra],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(resumed: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    assert resumed["global_step"] == uninterrupted["global_step"] == STEPS
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    for name, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    moments = zip(
        resumed["optimizer_states"][0]["state"].values(), uninterrupted["optimizer_states"][0]["state"].values()
    )
    for state_a, state_b in moments:
        torch.testing.assert_close(state_a["exp_avg"], state_b["exp_avg"], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "packed", "finetune"])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, stage: str) -> None:
    make = {"pretrain": pretrain_config, "packed": packed_config, "finetune": finetune_config}[stage]
    reference = umd_fit(write_config(tmp_path / "reference", make(tmp_path), kill_at=None))
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed_config = write_config(tmp_path / "crashed", make(tmp_path), kill_at=KILL_AT)
    crashed = umd_fit(crashed_config)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    interrupted_at = load(last)
    assert interrupted_at["global_step"] == KILL_AT - KILL_AT % EVERY
    loader_state = interrupted_at["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["batches"] == 4 if stage != "finetune" else loader_state["batches"] > 0

    resumed_config = write_config(tmp_path / "crashed", make(tmp_path), kill_at=None)
    assert resumed_config == crashed_config
    resumed = umd_fit(resumed_config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr

    final, expected = load(last), load(tmp_path / "reference" / "ckpt" / "last.ckpt")
    assert_same_training_state(final, expected)
    if stage != "finetune":
        assert any(name.startswith("teacher.") for name in final["state_dict"])
    else:
        gm_state = next(v for k, v in final["callbacks"].items() if k.startswith("GMCoord"))
        assert gm_state == next(v for k, v in expected["callbacks"].items() if k.startswith("GMCoord"))
        assert gm_state["seed"] == 0


def test_loader_skips_the_batches_already_trained_on() -> None:
    data = list(range(12))
    uninterrupted = ResumableDataLoader(data, batch_size=3, seed=5)
    uninterrupted.sampler.set_epoch(1)
    full = [batch.tolist() for batch in uninterrupted]
    assert sorted(i for batch in full for i in batch) == data and full != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]

    killed = ResumableDataLoader(data, batch_size=3, seed=5)
    killed.sampler.set_epoch(1)
    iterator = iter(killed)
    next(iterator), next(iterator)
    state = killed.state_dict()
    assert state == {"epoch": 1, "batches": 2, "collate": None}

    resumed = ResumableDataLoader(data, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    rest = iter(resumed)  # created before set_epoch, as Lightning does on a resume
    resumed.sampler.set_epoch(1)
    assert [batch.tolist() for batch in rest] == full[2:]
    assert len(resumed) == 4
    # A checkpoint saved in another epoch does not skip anything in this one.
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == 4


def test_crash_while_writing_keeps_the_previous_last_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, target)

    real_save = torch.save

    def crash_mid_write(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 6}, target)
    monkeypatch.setattr(torch, "save", real_save)

    restored = io.load_checkpoint(target, weights_only=True)
    assert restored["global_step"] == 4 and torch.equal(restored["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 6}, target)
    assert io.load_checkpoint(target, weights_only=True)["global_step"] == 6
