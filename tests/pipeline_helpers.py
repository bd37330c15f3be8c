"""Test-only helpers: callbacks imported by the ``umd`` subprocesses of the pipeline tests (``PYTHONPATH`` holds
tests/), and the quiet in-process Trainers (one process, or two under DDP) the other tests fit with."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class ExitWithoutFinalising(pl.Callback):
    """In each spawned DDP process: once Python's exit handlers have run, end the process with its exit status
    (``os._exit``), without the interpreter's finalisation.

    Why: with gloo, torch's process-group threads release finished collectives (DDP's gradient all-reduces,
    all-gathers) on their own time. One released while the interpreter finalises needs the GIL, is refused, and the
    C++ runtime aborts the process ("terminate called without an active exception", SIGABRT) after a run that
    finished (core dumps: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``take_gil`` ->
    ``pthread_exit``). It failed 1-2 in 12 runs of a 2-process test on 2 busy cores. The exit status is kept
    (``sys.exit`` is watched), so a failing process still fails the test.
    """

    def __init__(self) -> None:
        self.parent = os.getpid()
        self.status = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if os.getpid() == self.parent:
            return
        original = sys.exit

        def watched(status: Any = None) -> None:
            self.status = status if isinstance(status, int) else (0 if status is None else 1)
            original(status)

        sys.exit = watched
        atexit.register(self._exit)  # registered last, so it runs first

    def _exit(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.status)


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar, summary or validation (``overrides`` on top); a
    spawned DDP run ends its processes with :class:`ExitWithoutFinalising`."""
    if overrides.get("strategy") == "ddp_spawn":
        overrides = {**overrides, "callbacks": [*overrides.get("callbacks", []), ExitWithoutFinalising()]}
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return pl.Trainer(**(options | overrides))


def ddp_trainer(**overrides: Any) -> pl.Trainer:
    """:func:`quiet_trainer` over two spawned CPU processes (gloo): the 2-process DDP tests' launcher."""
    return quiet_trainer(devices=2, strategy="ddp_spawn", **overrides)


class DumpParameters(pl.Callback):
    """Save every rank's final state dict to ``<folder>/rank<r>.pt`` (to compare the DDP replicas)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {name: value.detach().float().cpu().clone() for name, value in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


class SignalAtStep(pl.Callback):
    """Rank 0 sends ``signum`` to itself (or, with ``group``, to its whole process group) when ``global_step``
    reaches ``step`` (before that batch runs), as a scheduler's pre-emption (SIGTERM) or a Ctrl-C (SIGINT) would."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), group: bool = False) -> None:
        self.step = step
        self.signum = signum
        self.group = group
        self.sent = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step == self.step and trainer.global_rank == 0 and not self.sent:
            self.sent = True
            if self.group:  # the whole process group (DataLoader workers included), as a scheduler does
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)
