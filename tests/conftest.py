"""Shared pytest setup: no test may reach the network; fixtures for the repository and the real data."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub are imported by any test module, so nothing can download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _process_state_restored() -> Iterator[None]:
    """What a test changes for the whole process (torch's thread count, the library loggers' levels) is put back,
    so that one test's settings never decide another's result or speed."""
    import torch

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "umd_lightning")]
    threads, levels = torch.get_num_threads(), [logger.level for logger in loggers]
    yield
    torch.set_num_threads(threads)
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (read-only real data sets); skips the test when it is absent."""
    path = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture(scope="session")
def tiny_vqa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VQA model fine-tuned for 3 steps on the VQA-RAD fixture (seed 0), saved by Lightning."""
    import lightning.pytorch as pl
    from pipeline_helpers import quiet_trainer

    from umd_lightning.data import VQADataModule
    from umd_lightning.stages import FineTune

    pl.seed_everything(0)
    data = VQADataModule(
        dataset="vqa_rad",
        root=str(REPO_ROOT / "tests" / "data" / "vqa_rad"),
        image_size=32,
        batch_size=8,
        num_workers=0,
        scan="none",
    )
    model = FineTune(preset="tiny", lr=1e-2)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(model, datamodule=data)
    path = tmp_path_factory.mktemp("tiny_vqa") / "finetuned.ckpt"
    trainer.save_checkpoint(path)
    return path
