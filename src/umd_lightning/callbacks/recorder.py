"""A small callback that keeps per-step values in memory, for the demo, benchmarks and notebooks."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class StepRecorder(Callback):
    """Keeps, per optimiser step, the training loss and the GM-Coord coefficients when they are logged."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.coefficients: dict[str, list[float]] = {"k_t": [], "k_v": []}
        self.capped = False
        """Set by the demo when the stage's ``max_time`` safety cap stopped it before ``max_steps``."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))
        for name, values in self.coefficients.items():
            value = trainer.callback_metrics.get(f"gm_coord/{name}")
            if value is not None:
                values.append(float(value))
