"""Fine-tuning for VQA, image-text classification and retrieval (UMD_SPEC 4.1), ready for the GM-Coord callback.

The task, the number of outputs and their names (answers or classes) come from the DataModule when the model is
set up, and are saved in the checkpoint's hyper-parameters so a fine-tuned model loads and predicts on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from umd_lightning.callbacks.gm_coord import GMCoordInputs
from umd_lightning.errors import StageError
from umd_lightning.metrics.classification import classification_metrics
from umd_lightning.metrics.retrieval import recall_at_k
from umd_lightning.metrics.vqa import VQAAccuracy
from umd_lightning.models.backbone import BackboneOutput
from umd_lightning.models.heads import ClassifierHead, ITMHead, RetrievalHead
from umd_lightning.stages.base import Schedule, UMDStage

Task = Literal["vqa", "classification", "retrieval"]
TOP_ANSWERS = 5
"""Answers (with probabilities) in each ``umd predict`` row of a VQA model."""
TOP_CAPTIONS = 10
"""Captions (with scores) in each ``umd predict`` row of a retrieval model."""


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's rows (ranks may hold different numbers of rows: evaluation samplers do not pad)."""
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(gathered, counts)])


def describe_predictions(
    task: str, logits: Tensor, batch: dict[str, Any], labels: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Turn a batch of task outputs into one JSON-ready dict per sample.

    - ``vqa``: ``{"qid", "question", "answer", "top5": [[answer, probability], ...]}`` (sigmoid probabilities, as the
      head is trained with a per-answer BCE).
    - ``classification``: ``{"id", "label", "probabilities": {class: p}}`` (softmax).
    - ``retrieval``: ``{"image_index", "top10": [[caption id, score], ...]}``; ``labels`` are the caption ids.
    """
    logits = logits.detach().float().cpu()
    names = list(labels) if labels is not None else [str(i) for i in range(logits.shape[-1])]
    rows: list[dict[str, Any]] = []
    if task == "vqa":
        probabilities = logits.sigmoid()
        top = probabilities.topk(min(TOP_ANSWERS, probabilities.shape[-1]), dim=-1)
        for i in range(logits.shape[0]):
            pairs = [[names[j], round(float(p), 6)] for p, j in zip(top.values[i], top.indices[i])]
            rows.append(
                {
                    "qid": batch["qids"][i],
                    "question": batch["questions"][i],
                    "answer": pairs[0][0],
                    "top5": pairs,
                }
            )
    elif task == "classification":
        probabilities = logits.softmax(-1)
        for i in range(logits.shape[0]):
            rows.append(
                {
                    "id": batch["ids"][i],
                    "label": names[int(probabilities[i].argmax())],
                    "probabilities": {name: round(float(p), 6) for name, p in zip(names, probabilities[i])},
                }
            )
    elif task == "retrieval":
        top = logits.topk(min(TOP_CAPTIONS, logits.shape[-1]), dim=-1)
        for i in range(logits.shape[0]):
            rows.append(
                {
                    "image_index": int(batch["image_index"][i]),
                    "top10": [[names[j], round(float(s), 6)] for s, j in zip(top.values[i], top.indices[i])],
                }
            )
    else:
        raise ValueError(f"unknown task {task!r}")
    return rows


class FineTune(UMDStage):
    """Supervised fine-tuning of the shared backbone with a task head.

    - ``vqa``: ``BCEWithLogits(logits, targets) * |A|``; metrics: open / closed / overall accuracy.
    - ``classification``: cross-entropy over ``C`` classes; metrics: accuracy, macro-F1, macro AUROC.
    - ``retrieval``: cross-entropy over 16 candidate captions (true first) of a ``Linear(2D, 1)`` head initialised
      from the pre-trained ITM head's positive row; evaluation: R@1/5/10 both ways over the full score matrix.

    Args:
        task: ``vqa``, ``classification`` or ``retrieval``; ``None`` takes it from the DataModule.
        num_outputs: answers or classes (``None``: from the DataModule; unused for retrieval).
        labels: answer or class names, in output order (``None``: from the DataModule; saved for prediction).
        leak_notes: what makes this run's evaluation leaky (filled from the DataModule; printed with results).
        data_card: the data set, vocabulary and validation policies, text length and seeds of the run (filled
            from the DataModule; read by the exported model card).
        text_chunk: captions fused per forward pass when scoring retrieval (memory vs speed).
        lr: base learning rate (reference 5e-6).
        lr_mult: multiplier for the fusion layers, projections, poolers (reference 5).
        head_lr_mult: multiplier for the task head (reference 50 VQA, 10 classification, 5 retrieval).
        schedule: decay after warm-up (reference cosine).
        **kwargs: see :class:`~umd_lightning.stages.base.UMDStage`.
    """

    stage_name = "finetune"
    accepts_pretrained_from = ("pretrain", "calib")

    def __init__(
        self,
        task: Task | None = None,
        num_outputs: int | None = None,
        labels: list[str] | None = None,
        leak_notes: list[str] | None = None,
        data_card: dict[str, Any] | None = None,
        text_chunk: int = 256,
        lr: float = 5e-6,
        lr_mult: float = 5.0,
        head_lr_mult: float = 50.0,
        schedule: Schedule = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, lr_mult=lr_mult, head_lr_mult=head_lr_mult, schedule=schedule, **kwargs)
        self.head: nn.Module | None = None
        self.gm_coord_inputs: GMCoordInputs | None = None
        self._eval_scores: list[tuple[Tensor, Tensor]] = []
        self._eval_text: tuple[Tensor, Tensor] | None = None
        if task is not None and (task == "retrieval" or num_outputs):
            self._build_task(task, num_outputs, labels)

    def _build_task(self, task: str, num_outputs: int | None, labels: list[str] | None) -> None:
        if task not in ("vqa", "classification", "retrieval"):
            raise StageError(f"task must be 'vqa', 'classification' or 'retrieval', got {task!r}")
        joint = 2 * self.backbone.width
        if task == "retrieval":
            self.head = RetrievalHead(joint)
        else:
            if not num_outputs:
                raise StageError(f"task {task!r} needs num_outputs (the data module's answers or classes)")
            if labels is not None and len(labels) != num_outputs:
                raise StageError(f"{len(labels)} labels given for num_outputs={num_outputs}")
            self.head = ClassifierHead(joint, num_outputs)
        if task == "vqa":
            self.val_metric, self.test_metric = VQAAccuracy(), VQAAccuracy()
        elif task == "classification":
            self.val_metric = classification_metrics(num_outputs, prefix="val/")
            self.test_metric = classification_metrics(num_outputs, prefix="test/")

    def configure_model(self) -> None:
        """Build the task head from the DataModule when the task was not given (the CLI's case): the task, the
        outputs and their names are read from it and saved in the hyper-parameters, so checkpoints load alone."""
        if self._trainer is None:  # `load_from_checkpoint` calls this hook too; the head exists by then
            return
        if self.head is None:
            datamodule = self.trainer.datamodule
            task = getattr(datamodule, "task", None)
            if task not in ("vqa", "classification", "retrieval"):
                raise StageError(
                    "FineTune needs a downstream DataModule (VQADataModule, ClassificationDataModule or "
                    "RetrievalDataModule in mode: task), or task/num_outputs given explicitly"
                )
            if self.hparams.task not in (None, task):
                raise StageError(f"model task {self.hparams.task!r} does not match the data's task {task!r}")
            self.hparams.update(
                task=task,
                num_outputs=datamodule.num_outputs,
                labels=datamodule.labels,
                leak_notes=list(datamodule.leak_notes),
                data_card={
                    "dataset": getattr(datamodule, "dataset", None),
                    "vocab": getattr(datamodule, "vocab", None),
                    "validation": getattr(datamodule, "validation", None),
                    "max_text_length": getattr(datamodule, "max_text_length", None),
                    "data_seed": getattr(datamodule, "seed", None),
                    "seed": os.environ.get("PL_GLOBAL_SEED"),
                },
            )
            self._build_task(task, datamodule.num_outputs, datamodule.labels)
        else:
            data_labels = getattr(self.trainer.datamodule, "labels", None)
            if data_labels is not None and list(data_labels) != list(self.hparams.labels or []):
                raise StageError(
                    f"the data's {len(data_labels)} answers/classes differ from the {self.hparams.num_outputs} this "
                    "model was built with: use the vocabulary policy and data of the checkpoint's run"
                )
        super().configure_model()

    # ------------------------------------------------------------------------------------ hand-off
    def init_from_pretrained(self, source: Mapping[str, Tensor]) -> None:
        """The retrieval head starts from the pre-trained ITM head's positive row, when the checkpoint has one."""
        if self.hparams.task == "retrieval" and "itm_head.linear.weight" not in source:
            rank_zero_warn(
                f"[finetune] {self.hparams.pretrained} has no ITM head: the retrieval head starts random "
                "(UMD_SPEC 1.2 initialises it from the ITM head's positive row)"
            )
        if self.hparams.task == "retrieval" and "itm_head.linear.weight" in source:
            itm = ITMHead(2 * self.backbone.width)
            itm.load_state_dict(
                {k.removeprefix("itm_head."): v for k, v in source.items() if k.startswith("itm_head.")}
            )
            self.head.init_from_itm(itm)

    # ------------------------------------------------------------------------------------ GM-Coord
    def gm_coord_modalities(self) -> dict[str, list[nn.Module]]:
        return {"text": self.backbone.text_side(), "image": self.backbone.image_side()}

    def gm_coord_head(self) -> nn.Module:
        return self.head

    # ------------------------------------------------------------------------------------ forward
    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Task logits: (B, |A|) or (B, C) for VQA / classification, (B, K) for retrieval candidates given as
        ``input_ids`` (B, K, L)."""
        return self._logits(pixel_values, input_ids, attention_mask)[0]

    def _logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, BackboneOutput]:
        if input_ids.dim() == 3:  # retrieval candidates: one image, K captions
            batch, candidates, length = input_ids.shape
            image = self.backbone.embed_image(pixel_values).repeat_interleave(candidates, dim=0)
            flat_ids, flat_mask = input_ids.reshape(-1, length), attention_mask.reshape(-1, length)
            out = self.backbone.fuse(self.backbone.embed_text(flat_ids, flat_mask), flat_mask, image)
            return self.head(out.pooled).view(batch, candidates), out
        out = self.backbone(pixel_values, input_ids, attention_mask)
        return self.head(out.pooled), out

    def _loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(loss, target index) for the batch."""
        task = self.hparams.task
        if task == "vqa":
            targets = batch["targets"].to(logits.dtype)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
            return loss, targets.argmax(dim=-1)
        if task == "classification":
            return F.cross_entropy(logits.float(), batch["labels"]), batch["labels"]
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), target), target

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every sample of the batch was dropped (on_error: skip): no step
            return None
        logits, out = self._logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss, target = self._loss(logits, batch)
        self.check_finite({"loss": loss})
        batch_size = logits.shape[0]
        h_t, h_v = out.text_pooled.detach(), out.image_pooled.detach()
        if self.hparams.task == "retrieval":
            h_t, h_v = h_t.view(batch_size, -1, h_t.shape[-1]), h_v.view(batch_size, -1, h_v.shape[-1])
        self.gm_coord_inputs = GMCoordInputs(text=h_t, image=h_v, target=target)
        self.log("train/loss", loss.detach(), batch_size=batch_size, prog_bar=True)
        return loss

    # ------------------------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any] | None, stage: str) -> None:
        if batch is None:  # every sample of the batch was dropped (on_error: skip)
            return
        task = self.hparams.task
        if task == "retrieval":
            self._score_images(batch)
            return
        metric = self.val_metric if stage == "val" else self.test_metric
        logits, _ = self._logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss, _ = self._loss(logits, batch)
        self.log(f"{stage}/loss", loss, batch_size=logits.shape[0], sync_dist=True)
        if task == "vqa":
            metric.update(logits.argmax(-1), batch["answer_index"], batch["is_closed"])
        else:
            metric.update(logits.float().softmax(-1), batch["labels"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        task = self.hparams.task
        if task == "retrieval":
            results = self._retrieval_results(stage)
        else:
            metric = self.val_metric if stage == "val" else self.test_metric
            computed = metric.compute()
            metric.reset()
            results = {f"{stage}/{k}": v for k, v in computed.items()} if task == "vqa" else dict(computed)
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in results.items()})
        return {k: float(v) for k, v in results.items()}

    def on_validation_epoch_start(self) -> None:
        self._prepare_retrieval("val")

    def on_test_epoch_start(self) -> None:
        self._prepare_retrieval("test")

    def on_validation_epoch_end(self) -> None:
        self.last_results = self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.last_results = self._eval_epoch_end("test")

    # ------------------------------------------------------------------------------------ retrieval scoring
    def _prepare_retrieval(self, stage: str) -> None:
        if self.hparams.task != "retrieval":
            return
        # The DataModule hands over the split and its tokenised captions (RetrievalDataModule.eval_captions).
        split, input_ids, attention_mask = self.trainer.datamodule.eval_captions(
            "validate" if stage == "val" else "test"
        )
        self._eval_split = split
        self._eval_text = (input_ids.to(self.device), attention_mask.to(self.device))
        self._eval_scores = []

    @torch.no_grad()
    def _score_images(self, batch: dict[str, Any]) -> Tensor:
        """Cross-encoder scores (B, T) of each image in the batch against every caption of the split."""
        input_ids, attention_mask = self._eval_text
        images = self.backbone.embed_image(batch["pixel_values"])
        rows = []
        for image in images:
            row = []
            for start in range(0, input_ids.shape[0], self.hparams.text_chunk):
                ids = input_ids[start : start + self.hparams.text_chunk]
                mask = attention_mask[start : start + self.hparams.text_chunk]
                text = self.backbone.embed_text(ids, mask)
                out = self.backbone.fuse(text, mask, image.unsqueeze(0).expand(ids.shape[0], -1, -1))
                row.append(self.head(out.pooled).float())
            rows.append(torch.cat(row))
        scores = torch.stack(rows)
        self._eval_scores.append((batch["image_index"], scores))
        return scores

    def _retrieval_results(self, stage: str) -> dict[str, float]:
        indices = torch.cat([i for i, _ in self._eval_scores]).to(self.device)
        scores = torch.cat([s for _, s in self._eval_scores]).to(self.device)
        if self.trainer.world_size > 1:
            indices, scores = gather_rows(indices), gather_rows(scores)
        # Keep one row per image, in image order (a padding sampler would repeat some).
        order = torch.argsort(indices, stable=True)
        indices, scores = indices[order], scores[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]
        scores = scores[first].cpu()
        split = self._eval_split
        if scores.shape[0] != len(split.image_captions):
            raise StageError(f"scored {scores.shape[0]} images but the {stage} split has {len(split.image_captions)}")
        results = recall_at_k(scores, list(split.image_captions), list(split.captions))
        self._eval_scores = []
        return {f"{stage}/{k}": float(v) for k, v in results.items()}

    # ------------------------------------------------------------------------------------ prediction
    def on_predict_epoch_start(self) -> None:
        self._prepare_retrieval("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample (see :func:`describe_predictions`); retrieval
        ranks the test split's captions for each image."""
        if self.hparams.task == "retrieval":
            scores = self._score_images(batch)
            self._eval_scores = []
            return describe_predictions("retrieval", scores, batch, self._eval_split.caption_ids)
        logits = self(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return describe_predictions(self.hparams.task, logits, batch, self.hparams.labels)
