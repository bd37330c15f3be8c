"""Pre-emption: a SIGTERM (a scheduler's pre-emption, ``docker stop``) or Ctrl-C saves a resumable ``last.ckpt``
and ends the run with a non-zero status, so ``umd fit ... && <next stage>`` stops and a resubmitted job resumes
with ``--ckpt_path last``.

Lightning alone turns SIGTERM into an exit with status 0 that saves nothing, and Ctrl-C into a
``KeyboardInterrupt`` wherever the step happens to be. :class:`Preemption` stops at the next optimiser-step
boundary instead, saves ``last.ckpt`` there and records the signal, so that ``umd`` exits with ``128 + signal``
(143 for SIGTERM, 130 for SIGINT).
SLURM's own requeue signal (``SIGUSR1`` with ``#SBATCH --signal=SIGUSR1@90``) stays Lightning's: it writes
``hpc_ckpt_<n>.ckpt`` in the run folder and requeues the job, which resumes from it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from umd_lightning.runs import LAST

_received: list[int] = []
"""Signals that stopped a fit in this process (read by ``umd``'s ``main`` for its exit status)."""


def interrupted_by() -> int | None:
    """The signal that stopped the last fit of this process, or ``None``."""
    return _received[-1] if _received else None


class Preemption(pl.Callback):
    """Save ``<checkpoint dirpath>/last.ckpt`` and stop when a fit receives SIGTERM or SIGINT.

    The signal only sets a flag (a handler must not run collectives or I/O); at the next optimiser-step boundary
    every rank agrees on it (one all-reduce of a flag under DDP, so a signal that reached rank 0 alone stops them
    all at the same step), saves the checkpoint the way ``ModelCheckpoint``'s step saves do (so ``--ckpt_path last``
    resumes exactly) and raises Lightning's ``SIGTERMException`` to end the fit. Lightning's own SIGTERM handler is
    replaced during training: it broadcasts from inside the signal handler, which can pair with another rank's
    collective and hang or break the process group.

    A signal at the fit's last optimiser step does not stop it: the fit finishes its final validation and
    checkpoints (``best.ckpt`` included) and ends normally, since a checkpoint saved before that validation would
    resume to an immediate end without it.

    The ``umd`` command adds it to every run; with a plain ``Trainer`` add it to ``callbacks``.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._signal: int | None = None
        self._step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signal = None
        self._step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = self._signal or int(signum)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._step:  # inside a gradient accumulation: wait for the optimiser step
            return
        self._step = trainer.global_step
        stop = self._signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self._signal or int(signal.SIGTERM)
        if _is_final_step(trainer):
            # Stopping here would save a checkpoint that has trained every step but not yet run the final
            # validation: resumed, it would stop at once and never write best.ckpt. What is left is that validation
            # and the final checkpoints, so the fit finishes (every rank decides alike: the step counts agree).
            self._signal = None
            rank_zero_info(
                f"[umd] {signal.Signals(signum).name} at the fit's last step ({trainer.global_step}): finishing it "
                "(final validation and checkpoints) instead of stopping"
            )
            return
        _received.append(signum)
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        path = folder / LAST
        trainer.save_checkpoint(path, weights_only=False)  # the full state: a resume needs it
        rank_zero_info(
            f"[umd] {signal.Signals(signum).name} at step {trainer.global_step}: saved {path}; resume with the same "
            "command and `--ckpt_path last`"
        )
        raise SIGTERMException

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()


def _is_final_step(trainer: pl.Trainer) -> bool:
    """Whether the optimiser step just taken is the fit's last (``max_steps``, or the last batch of the last epoch)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1  # -1: no epoch limit
    return bool(trainer.is_last_batch) and 0 < max_epochs <= trainer.current_epoch + 1


class FinalCheckpoint(pl.Callback):
    """Make ``last.ckpt`` the final state of every fit.

    ``ModelCheckpoint`` saves at epoch ends and after validations, so a fit that reaches ``max_steps`` part-way
    through an epoch would leave ``last.ckpt`` some steps behind the weights it trained (and the next stage would
    start from those). The ``umd`` command adds it to every run.
    """

    def __init__(self) -> None:
        self._saved_step: int | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._saved_step = int(checkpoint.get("global_step", -1))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if callback is None or not callback.dirpath or self._saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(Path(callback.dirpath) / LAST, weights_only=False)
