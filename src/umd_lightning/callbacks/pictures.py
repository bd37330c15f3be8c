"""Pictures in TensorBoard: what the model reconstructs and where it looks, for a few fixed validation samples.

* :class:`ReconstructionPictures` (MR-Pretrain, TD-Calib): after each validation, a grid per sample of the
  original, the masked input (masked patches grey) and the reconstruction (the MIM decoder's pixels, per-patch
  normalisation undone with the original patch's mean and variance, visible patches pasted back), under
  ``pictures/mim``. The samples (the first validation batch's first ``samples``) and their masks are fixed, so the
  pictures of successive validations are comparable.
* :class:`ExplanationPictures` (fine-tuning, VQA / classification): after each validation, the attention rollout
  and Grad-CAM overlays (:mod:`umd_lightning.explain`) of fixed samples under ``pictures/explain``, and their
  questions with the predicted answers as a table (``pictures/answers``).
* :class:`TestTable`: after ``test``, every ``test/*`` metric (overall, open / closed answer types, counts) as a
  Markdown table in the log's text tab (``tables/test``), and for VQA the accuracy per question type
  (``tables/test_question_types``).

Only rank 0 draws; a run without a TensorBoard logger draws nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

from umd_lightning.data.transforms import CLIP_MEAN, CLIP_STD


def _writer(trainer: Trainer) -> Any | None:
    if not trainer.is_global_zero or trainer.sanity_checking:
        return None
    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return logger.experiment if logger is not None else None


def _to_unit(pixels: Tensor) -> Tensor:
    """Undo the CLIP normalisation: (B, 3, H, W) in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pixels.device)[:, None, None]
    return (pixels * std + mean).clamp(0, 1)


class _FixedSamples(Callback):
    """Keeps the first ``samples`` of the first validation batch (on the CPU) for the pictures."""

    def __init__(self, samples: int = 4) -> None:
        self.samples = samples
        self.batch: dict[str, Tensor] | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.batch is None and batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, dict):
            n = self.samples
            self.batch = {k: v[:n].detach().cpu().clone() if isinstance(v, Tensor) else v[:n] for k, v in batch.items()}


class ReconstructionPictures(_FixedSamples):
    """Original / masked / reconstructed grids of fixed validation samples (MR-Pretrain, TD-Calib).

    Args:
        samples: how many validation samples to draw.
        seed: the masks' seed (the same masks at every validation).
    """

    def __init__(self, samples: int = 4, seed: int = 0) -> None:
        super().__init__(samples)
        self.seed = seed

    @torch.no_grad()
    def reconstruct(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> Tensor:
        """(3 * B, 3, H, W) in [0, 1]: per sample its original, masked and reconstructed image."""
        from umd_lightning.models.masking import patchify, random_masking, unpatchify
        from umd_lightning.stages.reconstruction import fusion_layer

        device = pl_module.device
        pixels = batch["pixel_values"].to(device)
        patch = pl_module.backbone_config.vision.patch_size
        grid = pl_module.backbone.vision.grid_size(tuple(pixels.shape[-2:]))
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        keep, mask = random_masking(
            pixels.shape[0], grid[0] * grid[1], pl_module.hparams.mask_ratio_image, "cpu", generator
        )
        keep, mask = keep.to(device), mask.to(device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            out = pl_module.backbone(pixels, batch["input_ids"].to(device), batch["attention_mask"].to(device), keep)
            predicted, _ = pl_module.mim_decoder(
                fusion_layer(out.image_layers, pl_module.backbone_config.decoder.mim_layer), keep, grid
            )
        finally:
            pl_module.train(was_training)
        patches = patchify(pixels, patch)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        restored = predicted.float() * (var + 1e-6).sqrt() + mean
        hidden = mask.bool()[..., None]
        reconstructed = torch.where(hidden, restored, patches)
        grey = torch.zeros_like(patches)  # 0 in normalised space: the data set's mean colour
        masked = torch.where(hidden, grey, patches)
        views = [pixels, unpatchify(masked, patch, grid), unpatchify(reconstructed, patch, grid)]
        return _to_unit(torch.stack(views, dim=1).flatten(0, 1)).cpu()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _writer(trainer)
        if writer is None or self.batch is None or not hasattr(pl_module, "mim_decoder"):
            return
        pictures = self.reconstruct(pl_module, self.batch)
        writer.add_image("pictures/mim", make_grid(pictures, nrow=3, padding=2, pad_value=1.0), trainer.global_step)


class ExplanationPictures(_FixedSamples):
    """Rollout and Grad-CAM overlays with the predicted answers of fixed validation samples (fine-tuning).

    Args:
        samples: how many validation samples to draw.
    """

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _writer(trainer)
        task = pl_module.hparams.get("task")
        if writer is None or self.batch is None or task not in ("vqa", "classification"):
            return
        from umd_lightning.explain import overlay, patch_maps

        device = pl_module.device
        pixels = self.batch["pixel_values"].to(device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            logits, maps = patch_maps(
                pl_module.backbone,
                pl_module.head,
                pixels,
                self.batch["input_ids"].to(device),
                self.batch["attention_mask"].to(device),
            )
        finally:
            pl_module.train(was_training)
        labels = list(pl_module.hparams.labels or [str(i) for i in range(logits.shape[-1])])
        probabilities = logits.sigmoid() if task == "vqa" else logits.softmax(-1)
        images = (_to_unit(pixels).cpu() * 255).round().byte().permute(0, 2, 3, 1).numpy()
        tiles = []
        for i, image in enumerate(images):
            tiles.append(torch.from_numpy(image).permute(2, 0, 1))
            for name in maps:
                tiles.append(torch.from_numpy(np.array(overlay(image, maps[name][i].numpy()))).permute(2, 0, 1))
        grid = make_grid(torch.stack(tiles), nrow=1 + len(maps), padding=2, pad_value=255)
        writer.add_image("pictures/explain", grid, trainer.global_step)
        questions = self.batch.get("questions") or self.batch.get("texts") or [""] * len(images)
        rows = ["| sample | question | predicted | p |", "|---|---|---|---|"]
        for i, question in enumerate(questions):
            best = int(probabilities[i].argmax())
            rows.append(f"| {i} | {question} | {labels[best]} | {float(probabilities[i, best]):.3f} |")
        columns = ", ".join(["image", *maps])
        writer.add_text("pictures/answers", f"columns: {columns}\n\n" + "\n".join(rows), trainer.global_step)


class TestTable(Callback):
    """Every ``test/*`` metric as a Markdown table in TensorBoard's text tab after ``test``."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        if logger is None or not metrics:
            return
        rows = ["| metric | value |", "|---|---|"]
        for name, value in sorted(metrics.items()):
            if name.startswith("test/type/"):
                continue
            shown = f"{value:.0f}" if name.split("/")[-1].startswith("n") else f"{value:.4f}"
            rows.append(f"| {name.removeprefix('test/')} | {shown} |")
        logger.experiment.add_text("tables/test", "\n".join(rows), trainer.global_step)
        types = sorted({name.split("/")[2] for name in metrics if name.startswith("test/type/")})
        if types:  # VQA: one row per question type (a question of two types counts in both)
            rows = ["| question type | questions | accuracy |", "|---|---|---|"]
            for kind in types:
                count, accuracy = metrics[f"test/type/{kind}/n"], metrics[f"test/type/{kind}/accuracy"]
                rows.append(f"| {kind} | {count:.0f} | {accuracy:.4f} |")
            logger.experiment.add_text("tables/test_question_types", "\n".join(rows), trainer.global_step)
