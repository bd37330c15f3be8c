"""Writing checkpoints so a crash never corrupts them, and reading weights without running pickled code.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the target folder, flushes it to
  disk and renames it over the target in one step (``os.replace``): a process killed while saving leaves the
  previous ``last.ckpt`` whole.
* :func:`read_weights` reads ``.safetensors`` files with safetensors and anything else with
  ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused unless the caller opts
  in with ``trust_pickle=True`` or the environment variable ``UMD_TRUST_PICKLE=1``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from umd_lightning.weights import TRUST_PICKLE_ENV, UntrustedPickleError, read_weights, trusts_pickle

__all__ = ["TRUST_PICKLE_ENV", "AtomicCheckpointIO", "UntrustedPickleError", "read_weights", "trusts_pickle"]


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
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)


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
