"""Writing checkpoints so a crash never corrupts them, finding output faults before training, and reading weights
without running pickled code.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the target folder, flushes it to
  disk and renames it over the target in one step (``os.replace``): a process killed while saving leaves the
  previous ``last.ckpt`` whole. The file gets the mode Lightning's own writer would give it (the umask's), and
  a full disk is reported as such, naming the file.
* :class:`RunFolderGuard` (a callback) checks, before the first step, that every output folder can be written,
  and locks each checkpoint folder (:func:`acquire_run_lock`) so that a second run writing into it at the same
  time stops at once with one line instead of mixing its checkpoints with the first run's.
* :func:`newest_readable_checkpoint` picks the checkpoint to resume from when ``last.ckpt`` is unreadable.
* :func:`read_weights` reads ``.safetensors`` files with safetensors and anything else with
  ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused unless the caller opts
  in with ``trust_pickle=True`` or the environment variable ``UMD_TRUST_PICKLE=1``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from umd_lightning.errors import (
    DiskFullError,
    OutputFolderError,
    RunFolderInUseError,
    UntrustedPickleError,
)
from umd_lightning.weights import TRUST_PICKLE_ENV, read_weights, trusts_pickle

__all__ = [
    "TRUST_PICKLE_ENV",
    "AtomicCheckpointIO",
    "DiskFullError",
    "OutputFolderError",
    "RunFolderGuard",
    "RunFolderInUseError",
    "RunLock",
    "UntrustedPickleError",
    "acquire_run_lock",
    "check_writable",
    "newest_readable_checkpoint",
    "read_weights",
    "trusts_pickle",
]

log = logging.getLogger(__name__)

LOCK_FILE = ".umd-run.lock"
"""The lock file :func:`acquire_run_lock` holds in a run folder (its text names the holder)."""

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# torch's zip writer reports a failed or short write of a Python stream as one of these, without the errno.
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are all-or-nothing.

    The checkpoint goes to a hidden temporary file next to the target, is flushed and ``fsync``-ed, then
    ``os.replace``-d over the target (atomic on POSIX and Windows within one file system) and the folder entry is
    ``fsync``-ed. On any error the temporary file is removed and the target is untouched. Remote paths
    (``s3://`` etc.) use Lightning's own transactional write.

    Install it with ``Trainer(plugins=[AtomicCheckpointIO()])``, or in YAML under ``trainer.plugins`` as
    ``- class_path: umd_lightning.checkpointing.AtomicCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            # mkstemp creates 0600; a replaced file keeps its mode, a new one gets the umask's, as open() would.
            os.fchmod(handle, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~current_umask())
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException as exc:
            Path(temporary).unlink(missing_ok=True)
            if _is_disk_full(exc):
                raise DiskFullError(
                    f"disk full while writing {target} ({_first_line(exc)}): free space on that disk or point "
                    "checkpoint.dirpath elsewhere; the previous checkpoint of that name is untouched"
                ) from exc
            raise
        _fsync_folder(target.parent)


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a write that ran out of space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(current, RuntimeError) and any(marker in str(current) for marker in _TORCH_SHORT_WRITE):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _is_local(path: Any) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (the folder entry); folders cannot be opened for this on Windows."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ------------------------------------------------------------------------------------------ output folders
def check_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and write (then remove) a small file in it.

    Args:
        folder: the folder a run will write to.
        what: the setting that names it, for the message (e.g. ``checkpoint.dirpath``).

    Returns:
        The folder.

    Raises:
        OutputFolderError: the folder cannot be created or written (read-only, not a folder, no permission).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".umd-write-check.", dir=folder) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputFolderError(
            f"{what} {folder} is not writable ({reason}): fix its permissions or choose another folder "
            "(found before training, so no step was lost)"
        ) from exc
    return folder


class RunLock:
    """A held lock on a run folder (see :func:`acquire_run_lock`); :meth:`release` gives it back."""

    def __init__(self, folder: Path, lock: FileLock) -> None:
        self.folder = folder
        self._lock = lock

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


def acquire_run_lock(folder: str | Path) -> RunLock:
    """Lock ``folder`` for this process (an OS file lock on ``<folder>/.umd-run.lock``, released when the process
    ends, even by a crash, so a lock never outlives its run).

    Raises:
        RunFolderInUseError: another process holds the lock (the message names it and what to do).
        OutputFolderError: the lock file cannot be created.
    """
    folder = check_writable(folder, "run folder")
    path = folder / LOCK_FILE
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            holder = "another process"
        raise RunFolderInUseError(
            f"run folder {folder} is in use by another run ({holder}): wait for it to end, or give this run "
            "another checkpoint.dirpath (two runs in one folder mix their checkpoints)"
        ) from None
    started = datetime.datetime.now().isoformat(timespec="seconds")
    with contextlib.suppress(OSError):  # the lock holds without its description
        path.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n", encoding="utf-8")
    return RunLock(folder, lock)


class RunFolderGuard(Callback):
    """Before the first training step: every output folder of the run (each ``ModelCheckpoint``'s folder and each
    logger's) is writable, and each checkpoint folder is locked for this run until it ends.

    Only the global-zero process checks and locks (the others do not write checkpoints). Remote folders
    (``s3://`` ...) are not checked.

    Raises (from ``on_fit_start``):
        OutputFolderError: a folder cannot be written.
        RunFolderInUseError: another run is writing into a checkpoint folder.
    """

    def __init__(self) -> None:
        self._locks: list[RunLock] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        checkpoint_folders = [
            callback.dirpath
            for callback in trainer.callbacks
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None
        ]
        for folder in checkpoint_folders:
            if _is_local(folder):
                check_writable(folder, "checkpoint folder (checkpoint.dirpath)")
        for logger in trainer.loggers:
            folder = logger.log_dir
            if folder is not None and _is_local(folder):
                check_writable(folder, f"log folder of {type(logger).__name__} (trainer.logger)")
        for folder in dict.fromkeys(checkpoint_folders):
            if _is_local(folder):
                self._locks.append(acquire_run_lock(folder))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A failed fit skips `teardown`: give the folder back now, not when the process ends.
        self._release()

    def _release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []


# ------------------------------------------------------------------------------------------ resuming
def is_readable_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` loads with ``torch.load(weights_only=True)`` (memory-mapped: the tensors are not read)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any failure to load means "not readable", whatever the reason
        return False
    return True


def newest_readable_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint of a run folder to resume from: ``last.ckpt`` if it loads, else the newest (by
    modification time) other ``*.ckpt`` that loads with ``weights_only``; ``None`` when none does.

    Each unreadable file passed over is logged as a warning naming it.
    """
    folder = Path(folder)
    last = folder / "last.ckpt"
    others = sorted(
        (path for path in folder.glob("*.ckpt") if path.name != last.name and path.is_file()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for path in [last, *others] if last.is_file() else others:
        if is_readable_checkpoint(path):
            return path
        log.warning("checkpoint %s is not readable (truncated or corrupt); passing over it", path)
    return None
