"""Test-only callback imported by the ``umd`` subprocesses of ``test_experiment.py`` (``PYTHONPATH`` holds tests/)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class KillRunnerAtStep(pl.Callback):
    """SIGKILL the parent process (the experiment runner) when ``global_step`` reaches ``step``, once: the first run
    to get there writes ``marker``, and a run that finds it does nothing (so the resumed grid goes on)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getppid()))
            os.kill(os.getppid(), signal.SIGKILL)
