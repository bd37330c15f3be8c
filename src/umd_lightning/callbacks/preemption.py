"""Pre-emption: a SIGTERM (a scheduler's pre-emption, ``docker stop``) or Ctrl-C saves a resumable ``last.ckpt``
and ends the run with a non-zero status, so ``umd fit ... && <next stage>`` stops and a resubmitted job resumes
with ``--ckpt_path last``.

Lightning already turns SIGTERM into a ``SIGTERMException`` raised at the next batch boundary, on every rank at the
same step, but then exits with status 0 and saves nothing. This callback saves the checkpoint in that exception's
``on_exception`` hook, routes Ctrl-C (SIGINT) through the same batch-boundary path instead of interrupting a step
half-way, and records the signal so that ``umd`` exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT).
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
    """Save ``<checkpoint dirpath>/last.ckpt`` when a fit is stopped by SIGTERM or SIGINT, at a batch boundary.

    The ``umd`` command adds it to every run; with a plain ``Trainer`` add it to ``callbacks``.
    """

    def __init__(self) -> None:
        self._previous_sigint: Any = None
        self._sigint = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sigint = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # Lightning's SIGTERM handler asks the loops to stop at the next batch boundary (and, on rank 0, passes the
        # signal to the other ranks): a KeyboardInterrupt raised mid-step could save a half-updated model.
        self._sigint = True
        signal.raise_signal(signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        signum = signal.SIGINT if self._sigint else signal.SIGTERM
        _received.append(int(signum))
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        path = folder / LAST
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"[umd] {signal.Signals(signum).name} at step {trainer.global_step}: saved {path}; resume with the same "
            "command and `--ckpt_path last`"
        )


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
        trainer.save_checkpoint(Path(callback.dirpath) / LAST)
