"""Run folders: where a stage writes its checkpoints and logs, and how the next stage and a resume find them.

Every shipped config names a stable folder, ``runs/<stage>/<dataset>/`` (``run_dir:`` in the YAML), holding

* ``last.ckpt``: the newest state, what ``--ckpt_path last`` resumes from and what MR-Pretrain hands on;
* ``best.ckpt``: the best validation checkpoint of a stage that monitors a metric (TD-Calib hands its best
  ``val/recon`` checkpoint on, fine-tuning tests its best one);
* ``logs/``: TensorBoard events and the resolved ``config.yaml``.

A ``pretrained:`` path may be a checkpoint file or a stage folder such as ``runs/pretrain``: a folder resolves to
the one run inside it (its ``best.ckpt``, else its ``last.ckpt``) and is an error when it holds none or several.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from umd_lightning.errors import ConfigError

LAST = "last.ckpt"
BEST = "best.ckpt"


def default_run_dir(stage: str, dataset: str) -> Path:
    """``runs/<stage>/<dataset>``: the folder a config without ``run_dir`` writes to."""
    return Path("runs") / stage / dataset


def run_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a finished run hands on: ``best.ckpt`` when the run kept one, else ``last.ckpt``."""
    for name in (BEST, LAST):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_pretrained(path: str | Path, option: str = "model.init_args.pretrained") -> Path:
    """The checkpoint file a ``pretrained:`` value points at.

    Args:
        path: a checkpoint file, a run folder (``runs/calib/vqa_rad``) or a stage folder (``runs/pretrain``)
            holding exactly one run.
        option: the option's name, for the messages.

    Raises:
        ConfigError: nothing there, or a stage folder with several runs (they are listed).
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        own = run_checkpoint(path)
        if own is not None:
            return own
        runs = sorted(found for child in path.iterdir() if child.is_dir() and (found := run_checkpoint(child)))
        if len(runs) == 1:
            return runs[0]
        if len(runs) > 1:
            listed = ", ".join(str(run) for run in runs)
            raise ConfigError(f"{path} holds {len(runs)} runs ({listed}): set {option} to the one to start from")
    raise ConfigError(
        f"pretrained checkpoint not found: {path} (run the previous stage first, or set {option} to its checkpoint)"
    )


def checkpoint_stage(path: str | Path) -> str | None:
    """The ``umd_stage`` saved in a checkpoint (``None`` for a checkpoint of no UMD stage), read with ``mmap`` so
    the tensors are not loaded into memory.

    Raises:
        ConfigError: the file cannot be read as a weights-only checkpoint.
    """
    from umd_lightning.errors import UnreadableWeightsError, UntrustedPickleError
    from umd_lightning.weights import read_weights

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # Not a memory-mappable weights-only file: the weights reader says which (corrupt, or needs unpickling).
        try:
            checkpoint = read_weights(path)
        except (UnreadableWeightsError, UntrustedPickleError) as exc:
            raise ConfigError(str(exc)) from None
    return checkpoint.get("umd_stage") if isinstance(checkpoint, dict) else None


def existing_checkpoints(folder: Path) -> list[Path]:
    """The ``*.ckpt`` files directly inside ``folder`` (none when it does not exist)."""
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def describe_folder(config: dict[str, Any] | None) -> str:
    """A short name for the data of a resolved config (for the default run folder)."""
    init = (config or {}).get("init_args") or {}
    if init.get("dataset"):
        return str(init["dataset"])
    sources = init.get("sources") or []
    formats = [str(s.get("format") if isinstance(s, dict) else getattr(s, "format", "")) for s in sources]
    return "+".join(f for f in formats if f) or "data"


def evaluation_leaks(model: Any, datamodule: Any) -> list[str]:
    """What makes an evaluation leaky: the model's training-time policy (saved in its hyper-parameters) and the
    data's evaluation-time policy, each note once."""
    notes = list((getattr(model, "hparams", None) or {}).get("leak_notes") or [])
    for note in getattr(datamodule, "leak_notes", []) or []:
        if note not in notes:
            notes.append(note)
    return notes
