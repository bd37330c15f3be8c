"""Output faults found before training or named when they happen: an unwritable folder stops the run before the
first step, a full disk is called a full disk, checkpoints get the umask's mode, a second run cannot write into a
locked run folder, and the newest readable checkpoint is found when ``last.ckpt`` is broken."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import TorchCheckpointIO

from umd_lightning import checkpointing
from umd_lightning.checkpointing import (
    LOCK_FILE,
    AtomicCheckpointIO,
    DiskFullError,
    OutputFolderError,
    RunFolderGuard,
    RunFolderInUseError,
    acquire_run_lock,
    check_writable,
    newest_readable_checkpoint,
)
from umd_lightning.cli import main

FIXTURES = Path(__file__).resolve().parent / "data"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def blocked_folder(tmp_path: Path) -> Path:
    """A folder path that cannot be created, for root too: its parent is a regular file."""
    (tmp_path / "a_file").write_text("not a folder\n")
    return tmp_path / "a_file" / "checkpoints"


# ------------------------------------------------------------------------------------------------ writable
def test_a_folder_under_a_file_is_not_writable(tmp_path):
    folder = blocked_folder(tmp_path)
    with pytest.raises(OutputFolderError) as caught:
        check_writable(folder, "checkpoint folder (checkpoint.dirpath)")
    message = str(caught.value)
    assert message.startswith(f"checkpoint folder (checkpoint.dirpath) {folder} is not writable (")
    assert "no step was lost" in message and "\n" not in message
    assert check_writable(tmp_path / "new" / "folder", "x").is_dir()
    assert list((tmp_path / "new" / "folder").iterdir()) == []  # the probe file is gone


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders; the file-as-parent case covers root")
def test_a_read_only_folder_is_not_writable(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputFolderError, match="is not writable"):
            check_writable(folder, "checkpoint folder")
    finally:
        folder.chmod(0o755)


def trainer(tmp_path: Path, dirpath: Path, **more) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[ModelCheckpoint(dirpath=str(dirpath), save_last=True), RunFolderGuard()],
        plugins=[AtomicCheckpointIO()],
        **more,
    )


def test_an_unwritable_checkpoint_folder_stops_the_run_before_the_first_step(tmp_path):
    fit = trainer(tmp_path, blocked_folder(tmp_path))
    model = BoringModel()
    with pytest.raises(OutputFolderError, match=r"a_file/checkpoints is not writable"):
        fit.fit(model)
    assert fit.global_step == 0


def test_the_umd_command_reports_an_unwritable_folder_in_one_line(tmp_path, capsys):
    config = {
        "seed_everything": 0,
        "model": {"class_path": "umd_lightning.stages.MRPretrain", "init_args": {"preset": "tiny"}},
        "data": {
            "class_path": "umd_lightning.data.PretrainDataModule",
            "init_args": {
                "sources": [{"format": "roco", "root": str(FIXTURES / "roco")}],
                "image_size": 32,
                "batch_size": 4,
                "num_workers": 0,
            },
        },
        "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "checkpoint": {"dirpath": str(blocked_folder(tmp_path))},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("umd: error: checkpoint folder (checkpoint.dirpath) ") and "is not writable" in err


# ------------------------------------------------------------------------------------------------ disk full
class FillingDisk(io.RawIOBase):
    """A real file that runs out of space after ``room`` bytes (``OSError(ENOSPC)``, as the kernel reports)."""

    def __init__(self, handle: int, room: int) -> None:
        self._file = io.FileIO(handle, "wb")
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._file.write(data)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()
        super().close()


@pytest.mark.parametrize("room", [10, 3000], ids=["first-write", "mid-file"])
def test_a_full_disk_is_named_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, room):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.zeros(8)}, target)
    before = target.read_bytes()
    monkeypatch.setattr(checkpointing.os, "fdopen", lambda handle, mode: FillingDisk(handle, room))
    with pytest.raises(DiskFullError) as caught:
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(4096)}, target)
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {target} (") and "\n" not in message
    if room == 3000:  # torch's zip writer reports the short write itself
        assert "unexpected pos" in message
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def broken(handle, mode):
        os.close(handle)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpointing.os, "fdopen", broken)
    with pytest.raises(PermissionError):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ file mode
def test_checkpoints_get_the_mode_lightnings_writer_gives(tmp_path):
    # At the process's own umask: fsspec (under Lightning's writer) caches the first umask it sees, so changing
    # the umask around Lightning's writer here would change it for every later test.
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "atomic.ckpt")
    TorchCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "lightning.ckpt")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["atomic.ckpt"] == modes["lightning.ckpt"] == 0o666 & ~checkpointing.current_umask()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "atomic.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "atomic.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_replaced_checkpoint_keeps_its_mode(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    target.chmod(0o640)
    AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert target.stat().st_mode & 0o777 == 0o640
    assert torch.load(target, weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------------------------ run lock
def test_a_second_lock_on_a_run_folder_is_refused_in_one_line(tmp_path):
    first = acquire_run_lock(tmp_path / "run")
    with pytest.raises(RunFolderInUseError) as caught:
        acquire_run_lock(tmp_path / "run")
    message = str(caught.value)
    assert message.startswith(f"run folder {tmp_path / 'run'} is in use by another run (pid {os.getpid()} on ")
    assert "another checkpoint.dirpath" in message and "\n" not in message
    first.release()
    acquire_run_lock(tmp_path / "run").release()


def test_a_lock_held_by_another_process_refuses_this_one_until_it_ends(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from umd_lightning.checkpointing import acquire_run_lock; "
            f"lock = acquire_run_lock({str(folder)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderInUseError, match=rf"in use by another run \(pid {holder.pid} on "):
            acquire_run_lock(folder)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the dead process's lock (no stale lock file to delete by hand)
        try:
            acquire_run_lock(folder).release()
            break
        except RunFolderInUseError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_two_runs_in_one_folder_stop_the_second_before_its_first_step(tmp_path):
    folder = tmp_path / "checkpoints"
    held = acquire_run_lock(folder)  # the "first run", still going
    second = trainer(tmp_path, folder)
    with pytest.raises(RunFolderInUseError):
        second.fit(BoringModel())
    assert second.global_step == 0 and not list(folder.glob("*.ckpt"))
    held.release()
    third = trainer(tmp_path, folder)
    third.fit(BoringModel())
    assert (folder / "last.ckpt").is_file() and (folder / LOCK_FILE).is_file()
    acquire_run_lock(folder).release()  # the finished run gave the folder back
    trainer(tmp_path, folder).fit(BoringModel())  # and a later run in the same folder starts


# ------------------------------------------------------------------------------------------------ resuming
def save(path: Path, step: int, mtime: float) -> None:
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(2)}}, path)
    os.utime(path, (mtime, mtime))


def test_newest_readable_checkpoint_prefers_last_then_the_newest_that_loads(tmp_path):
    assert newest_readable_checkpoint(tmp_path) is None
    save(tmp_path / "epoch=0-step=10.ckpt", 10, 1_000)
    save(tmp_path / "epoch=1-step=20.ckpt", 20, 2_000)
    save(tmp_path / "last.ckpt", 30, 1_500)
    assert newest_readable_checkpoint(tmp_path) == tmp_path / "last.ckpt"  # last.ckpt first, whatever its time
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes()[:100])  # a full disk cut it short
    assert newest_readable_checkpoint(tmp_path) == tmp_path / "epoch=1-step=20.ckpt"
    (tmp_path / "epoch=1-step=20.ckpt").write_text("not a checkpoint\n")
    os.utime(tmp_path / "epoch=1-step=20.ckpt", (2_000, 2_000))
    (tmp_path / ".last.ckpt.abc.tmp").write_bytes(b"partial")  # an interrupted atomic write: never a candidate
    assert newest_readable_checkpoint(tmp_path) == tmp_path / "epoch=0-step=10.ckpt"
    (tmp_path / "epoch=0-step=10.ckpt").unlink()
    assert newest_readable_checkpoint(tmp_path) is None


class FailingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("boom at the first step")


def test_a_failed_run_gives_its_folder_back(tmp_path):
    folder = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, folder).fit(FailingModel())
    acquire_run_lock(folder).release()
