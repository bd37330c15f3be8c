"""``umd predict``'s output: what ``predict_step`` returns, written as JSON lines by a ``BasePredictionWriter``.

The stage describes its predictions (one JSON-ready dict per sample, see
:meth:`umd_lightning.stages.finetune.FineTune.predict_step`); this writer only adds the leak label and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from umd_lightning.runs import evaluation_leaks


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes what ``predict_step`` returns as JSON lines, batch by batch, one file per process (rank suffix under
    DDP).

    Args:
        output: the file to write; default ``predictions.jsonl`` in the trainer's log folder.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._handle: IO[str] | None = None
        self._label: dict[str, Any] = {}
        self.path: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A model selected or scored under a leaky policy says so in every row it writes.
        notes = evaluation_leaks(pl_module, trainer.datamodule)
        self._label = {"leaky": True, "leak_notes": notes} if notes else {}
        path = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("w", encoding="utf-8")

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Sequence[dict[str, Any]] | None,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for row in prediction or []:
            self._handle.write(json.dumps({**row, **self._label}, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            leaky = f" (LEAKY evaluation: {'; '.join(self._label['leak_notes'])})" if self._label else ""
            print(f"predictions written to {self.path}{leaky}")
