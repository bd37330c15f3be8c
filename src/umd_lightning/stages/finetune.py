"""Fine-tuning for VQA, image-text classification and retrieval (UMD_SPEC 4.1), ready for the GM-Coord callback.

The task, the number of outputs and their names (answers or classes) come from the DataModule when the model is
set up, and are saved in the checkpoint's hyper-parameters so a fine-tuned model loads and predicts on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from umd_lightning.callbacks.gm_coord import GMCoordInputs
from umd_lightning.errors import StageError, check_range
from umd_lightning.models.backbone import BackboneOutput
from umd_lightning.models.heads import ITCHead, ITMHead
from umd_lightning.stages.base import Schedule, UMDStage
from umd_lightning.stages.itc import itc_term
from umd_lightning.stages.tasks import TASKS, FineTuneTask

Task = Literal["vqa", "classification", "retrieval"]
RetrievalEval = Literal["exhaustive", "topk"]


class FineTune(UMDStage):
    """Supervised fine-tuning of the shared backbone with a task head. What differs by task (head, loss, metrics,
    evaluation, prediction rows) is in ``stages/tasks/<task>.py``; the stage holds the backbone, the hand-off and
    the optimiser, and calls the task.

    - ``vqa``: ``BCEWithLogits(logits, targets) * |A|``; metrics: open / closed / overall accuracy.
    - ``classification``: cross-entropy over ``C`` classes; metrics: accuracy, macro-F1, macro AUROC.
    - ``retrieval``: cross-entropy over 16 candidate captions (true first) of a ``Linear(2D, 1)`` head initialised
      from the pre-trained ITM head's positive row; evaluation: R@1/5/10 both ways over the full score matrix.
      Optionally (``itc_weight > 0``) an image-text contrastive head is trained alongside, so that evaluation can
      rank every pair by its cosine and re-score only the best ``retrieval_top_k`` with the cross-encoder
      (``retrieval_eval: topk``, ALBEF's protocol) instead of all ``N x T`` (``exhaustive``, the paper's).

    Args:
        task: ``vqa``, ``classification`` or ``retrieval``; ``None`` takes it from the DataModule.
        num_outputs: answers or classes (``None``: from the DataModule; unused for retrieval).
        labels: answer or class names, in output order (``None``: from the DataModule; saved for prediction).
        leak_notes: what makes this run's evaluation leaky (filled from the DataModule; printed with results).
        data_card: the data set, vocabulary and validation policies, text length and seeds of the run (filled
            from the DataModule; read by the exported model card).
        text_chunk: captions fused per forward pass when scoring retrieval (memory vs speed).
        itc_weight: retrieval only: weight of the image-text contrastive loss added to the candidates'
            cross-entropy (0, the default, builds no ITC head). InfoNCE both ways over the batch's true pairs,
            gathered from every DDP process; the head starts from a pre-trained ``itc_head`` when ``pretrained``
            has one.
        itc_dim: the ITC head's shared embedding width.
        retrieval_eval: ``exhaustive`` (the paper's protocol: the cross-encoder scores every image-caption pair)
            or ``topk`` (the ITC head ranks all pairs; the cross-encoder re-scores each image's
            ``retrieval_top_k`` best captions for image-to-text and each caption's ``retrieval_top_k`` best
            images for text-to-image; every other pair ranks below them). ``topk`` needs ``itc_weight > 0``.
            Results files name the protocol used.
        retrieval_top_k: the ``k`` of ``retrieval_eval: topk``.
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
        itc_weight: float = 0.0,
        itc_dim: int = 256,
        retrieval_eval: RetrievalEval = "exhaustive",
        retrieval_top_k: int = 32,
        lr: float = 5e-6,
        lr_mult: float = 5.0,
        head_lr_mult: float = 50.0,
        schedule: Schedule = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, lr_mult=lr_mult, head_lr_mult=head_lr_mult, schedule=schedule, **kwargs)
        check_range("model.init_args.itc_weight", itc_weight, low=0.0)
        check_range("model.init_args.itc_dim", itc_dim, low=1)
        check_range("model.init_args.retrieval_top_k", retrieval_top_k, low=1)
        if retrieval_eval not in ("exhaustive", "topk"):
            raise StageError(f"model.init_args.retrieval_eval must be 'exhaustive' or 'topk', got {retrieval_eval!r}")
        if retrieval_eval == "topk" and itc_weight <= 0:
            raise StageError(
                "model.init_args.retrieval_eval=topk ranks the pairs with an ITC head, which this model does not have "
                "(itc_weight=0): fine-tune with model.init_args.itc_weight > 0 (e.g. 0.1), or evaluate with "
                "retrieval_eval: exhaustive"
            )
        self.itc_head = ITCHead(self.backbone.width, itc_dim) if itc_weight > 0 else None
        self.head: nn.Module | None = None
        self.task_impl: FineTuneTask | None = None
        self.gm_coord_inputs: GMCoordInputs | None = None
        if task is not None and (task == "retrieval" or num_outputs):
            self._build_task(task, num_outputs, labels)

    def _build_task(self, task: str, num_outputs: int | None, labels: list[str] | None) -> None:
        if task not in ("vqa", "classification", "retrieval"):
            raise StageError(f"task must be 'vqa', 'classification' or 'retrieval', got {task!r}")
        if task != "retrieval" and self.itc_head is not None:
            raise StageError(
                f"model.init_args.itc_weight={self.hparams.itc_weight} applies to retrieval fine-tuning only; "
                f"set it to 0 for task {task!r}"
            )
        if task != "retrieval":
            if not num_outputs:
                raise StageError(f"task {task!r} needs num_outputs (the data module's answers or classes)")
            if labels is not None and len(labels) != num_outputs:
                raise StageError(f"{len(labels)} labels given for num_outputs={num_outputs}")
        # The task's head, loss, metrics, evaluation and prediction rows live in stages/tasks/<task>.py.
        self.task_impl = TASKS[task]()
        self.head = self.task_impl.build_head(2 * self.backbone.width, num_outputs)
        val_metric, test_metric = self.task_impl.build_metrics(num_outputs)
        if val_metric is not None:
            self.val_metric, self.test_metric = val_metric, test_metric

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
    def pretrained_prefixes(self) -> tuple[str, ...]:
        return ("backbone.", "itc_head.") if self.itc_head is not None else ("backbone.",)

    def optional_prefixes(self) -> tuple[str, ...]:
        # MR-Pretrain trains an ITC head only when asked to: without one, fine-tuning starts it fresh.
        return ("itc_head.",) if self.itc_head is not None else ()

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
            logits, out, _, _ = self._candidate_logits(pixel_values, input_ids, attention_mask)
            return logits, out
        out = self.backbone(pixel_values, input_ids, attention_mask)
        return self.head(out.pooled), out

    def _candidate_logits(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, BackboneOutput, Tensor, Tensor]:
        """Retrieval scores (B, K) of each image's K candidate captions (B, K, L), the fused output, and the
        towers' embedded tokens: images (B, M, D) and candidates (B*K, L, D), for the ITC term."""
        batch, candidates, length = input_ids.shape
        image = self.backbone.embed_image(pixel_values)
        flat_ids, flat_mask = input_ids.reshape(-1, length), attention_mask.reshape(-1, length)
        text = self.backbone.embed_text(flat_ids, flat_mask)
        out = self.backbone.fuse(text, flat_mask, image.repeat_interleave(candidates, dim=0))
        return self.head(out.pooled).view(batch, candidates), out, image, text

    def _loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(loss, target index) for the batch (the task's loss)."""
        return self.task_impl.loss(logits, batch)

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every sample of the batch was dropped (on_error: skip): no step
            return None
        if self.itc_head is None:
            logits, out = self._logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            loss, target = self._loss(logits, batch)
            self.check_finite({"loss": loss})
        else:
            logits, out, image, text = self._candidate_logits(
                batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
            )
            ranking, target = self._loss(logits, batch)
            # The true caption is each image's first candidate.
            true_ids, true_mask = batch["input_ids"][:, 0], batch["attention_mask"][:, 0]
            candidates = batch["input_ids"].shape[1]
            itc = itc_term(self, self.itc_head, image, text[::candidates], true_ids, true_mask, gather=True)
            self.check_finite({"retrieval": ranking, "itc": itc})
            loss = ranking + self.hparams.itc_weight * itc
            terms = {"retrieval": ranking, "itc": itc, "itc_scale": self.itc_head.scale}
            self.log_terms("train", terms, batch_size=logits.shape[0])
        batch_size = logits.shape[0]
        h_t, h_v = out.text_pooled.detach(), out.image_pooled.detach()
        h_t, h_v = self.task_impl.gm_coord_features(h_t, h_v, batch_size)
        self.gm_coord_inputs = GMCoordInputs(text=h_t, image=h_v, target=target)
        self.log("train/loss", loss.detach(), batch_size=batch_size, prog_bar=True)
        return loss

    # ------------------------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any] | None, stage: str) -> None:
        if batch is None:  # every sample of the batch was dropped (on_error: skip)
            return
        self.task_impl.evaluation_step(self, batch, stage)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        results = self.task_impl.evaluation_results(self, stage)
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in results.items()})
        return {k: float(v) for k, v in results.items()}

    def on_validation_epoch_start(self) -> None:
        self.task_impl.prepare_evaluation(self, "val")

    def on_test_epoch_start(self) -> None:
        self.task_impl.prepare_evaluation(self, "test")

    def on_validation_epoch_end(self) -> None:
        self.last_results = self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.last_results = self._eval_epoch_end("test")

    def evaluation_protocol(self) -> dict[str, Any] | None:
        """How a retrieval model's evaluation scored the pairs (written with the results); ``None`` for other
        tasks."""
        if self.hparams.task != "retrieval":
            return None
        return self.task_impl.protocol(self) if self.task_impl is not None else None

    # ------------------------------------------------------------------------------------ prediction
    def on_predict_epoch_start(self) -> None:
        self.task_impl.prepare_evaluation(self, "predict")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample, described by the task (``stages/tasks/<task>.py``); retrieval ranks the
        test split's captions for each image."""
        return self.task_impl.predict_step(self, batch)
