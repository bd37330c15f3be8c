"""Masked reconstruction shared by MR-Pretrain and TD-Calib (UMD_SPEC 2 and 3).

One training step runs up to three passes:

1. the student on the masked image (visible patches only) and masked text (``mask_mode="joint"``; ``"separate"``
   runs M3AE's two passes instead),
2. the EMA teacher on the full image and text, without gradients (only when a feature loss is on),
3. the student on unmasked pairs, half of them with a swapped image, for ITM (only when ``w_itm > 0``).

The student's passes 1 and 3 share one call of the text tower, their texts stacked along the batch
(:meth:`ReconstructionStage._student_texts`).

``loss = w_itm * L_ITM + alpha * (w_mim * L_MIM + w_mlm * L_MLM + w_feamim * L_FeaMIM + w_feamlm * L_FeaMLM)``
``+ itc_weight * L_ITC``; a weight of 0 skips that term's computation. The optional ITC term (off by default) reads
the towers' embedded tokens of pass 1, so it needs no pass of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from umd_lightning import losses
from umd_lightning.errors import StageError, check_range
from umd_lightning.models.backbone import BackboneOutput
from umd_lightning.models.ema import EMATeacher
from umd_lightning.models.heads import FeaturePredictor, ITCHead, ITMHead, MIMDecoder, MLMHead
from umd_lightning.models.linear import Linear
from umd_lightning.models.masking import normalized_pixel_targets, patchify, random_masking
from umd_lightning.stages.base import Schedule, UMDStage
from umd_lightning.stages.itc import itc_term

EVAL_MODE_NOTICE = r"Found \d+ module\(s\) in eval mode at the start of training"
"""Lightning's warning about modules in eval mode when training starts (the EMA teacher's, on purpose)."""

MaskMode = Literal["joint", "separate"]
FeatureLoss = Literal["predictive", "reference"]


def fusion_layer(layers: list[Tensor], index: int) -> Tensor:
    """Pick a fusion layer's output: ``-1`` is the last, ``k >= 1`` the k-th (1-based, as in the papers)."""
    if index == -1:
        return layers[-1]
    if not 1 <= index <= len(layers):
        raise StageError(
            f"decoder.mim_layer={index} but the fusion has {len(layers)} layers: use -1 or 1..{len(layers)}"
        )
    return layers[index - 1]


class ReconstructionStage(UMDStage):
    """MIM, MLM, FeaMIM, FeaMLM and (optionally) ITM over image-text pairs.

    Args:
        mask_ratio_image: fraction of patches masked per sample.
        mask_mode: ``joint`` (one masked pass, UMD reference) or ``separate`` (M3AE's two passes).
        feature_loss: ``predictive`` (default: predictors after the decoder / on the text stream, targets from
            the teacher through a non-affine LayerNorm) or ``reference`` (the authors' code, with its defects; for
            reproduction only).
        alpha: weight of the reconstruction terms.
        w_itm: weight of ITM (0 builds no ITM head and skips the pass).
        w_mim: weight of pixel MIM.
        w_mlm: weight of MLM.
        w_feamim: weight of feature MIM.
        w_feamlm: weight of feature MLM.
        ema_momentum: EMA teacher momentum per optimiser step.
        itm_swap_prob: fraction of ITM pairs whose image is swapped for another sample's.
        itc_weight: weight of the image-text contrastive term (0, the default, builds no ITC head). ``> 0`` trains
            an ITC head (``itc_head``) on the masked pass's tower features, InfoNCE both ways over the batch's
            pairs gathered from every DDP process; retrieval fine-tuning with ``itc_weight > 0`` starts from it.
        itc_dim: the ITC head's shared embedding width.
        lr: base learning rate (pretrained towers).
        schedule: decay after warm-up, ``linear`` or ``cosine``.
        **kwargs: see :class:`~umd_lightning.stages.base.UMDStage`.
    """

    carries_itm_head: ClassVar[bool] = False
    """Build the ITM head even when ``w_itm = 0`` (frozen), so it passes through this stage to retrieval tuning."""

    def __init__(
        self,
        mask_ratio_image: float = 0.75,
        mask_mode: MaskMode = "joint",
        feature_loss: FeatureLoss = "predictive",
        alpha: float = 0.5,
        w_itm: float = 1.0,
        w_mim: float = 1.0,
        w_mlm: float = 1.0,
        w_feamim: float = 1.0,
        w_feamlm: float = 1.0,
        ema_momentum: float = 0.995,
        itm_swap_prob: float = 0.5,
        itc_weight: float = 0.0,
        itc_dim: int = 256,
        lr: float = 1e-5,
        schedule: Schedule = "linear",
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, schedule=schedule, **kwargs)
        if mask_mode not in ("joint", "separate"):
            raise StageError(f"mask_mode must be 'joint' or 'separate', got {mask_mode!r}")
        if feature_loss not in ("predictive", "reference"):
            raise StageError(f"feature_loss must be 'predictive' or 'reference', got {feature_loss!r}")
        # 1.0 would leave no patch to encode.
        check_range("model.init_args.mask_ratio_image", mask_ratio_image, low=0.0, high=1.0, high_open=True)
        weights = {"alpha": alpha, "w_itm": w_itm, "w_mim": w_mim, "w_mlm": w_mlm}
        for name, weight in {**weights, "w_feamim": w_feamim, "w_feamlm": w_feamlm, "itc_weight": itc_weight}.items():
            check_range(f"model.init_args.{name}", weight, low=0.0)
        check_range("model.init_args.ema_momentum", ema_momentum, low=0.0, high=1.0)
        check_range("model.init_args.itm_swap_prob", itm_swap_prob, low=0.0, high=1.0)
        if mask_ratio_image == 0 and (w_mim > 0 or w_feamim > 0):
            rank_zero_warn(
                f"model.init_args.mask_ratio_image=0 masks no image patch: MIM and FeaMIM are 0 at every step "
                f"although w_mim={w_mim} and w_feamim={w_feamim}; set mask_ratio_image > 0 (reference 0.75) "
                "or set w_mim and w_feamim to 0"
            )
        cfg = self.backbone_config
        width = self.backbone.width
        self.mim_decoder = MIMDecoder(width, cfg.decoder, cfg.vision.patch_size, feature_dim=width)
        self.mlm_head = MLMHead(width, self.backbone.text.vocab_size, cfg.fusion.norm_eps)
        self.itm_head = ITMHead(2 * width) if w_itm > 0 or self.carries_itm_head else None
        check_range("model.init_args.itc_dim", itc_dim, low=1)
        self.itc_head = ITCHead(width, itc_dim) if itc_weight > 0 else None
        uses_features = w_feamim > 0 or w_feamlm > 0
        self.feamlm_predictor = FeaturePredictor(width) if w_feamlm > 0 else None
        if feature_loss == "reference" and w_feamlm > 0:
            self.feamlm_predictor = Linear(width, width)
        self.teacher = EMATeacher(self.backbone, ema_momentum) if uses_features else None
        for parameter in self.unused_parameters():
            parameter.requires_grad_(False)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that no loss term of this configuration reaches: they are frozen (kept in checkpoints, left
        out of the optimiser), so DDP never waits for their gradients and no ``find_unused_parameters`` is needed.

        - ``w_itm = 0``: the ITM head (carried untouched) and both poolers (only ITM reads the pooled vectors);
        - the decoder's pixel output without pixel MIM, its feature output without predictive FeaMIM (the
          reference FeaMIM compares features before any decoder block), the whole decoder without either;
        - the MLM head without MLM;
        - a fusion layer's last image (text) output when nothing reads it: no ITM, and MIM taken at an earlier
          layer (no MLM / FeaMLM).
        """
        hp = self.hparams
        unused: list[nn.Module] = []
        parameters: list[nn.Parameter] = []
        if hp.w_itm <= 0:
            unused += [self.backbone.text_pooler, self.backbone.image_pooler]
            if self.itm_head is not None:
                unused.append(self.itm_head)
        decoder = self.mim_decoder
        predictive_feamim = hp.w_feamim > 0 and hp.feature_loss == "predictive"
        reference_feamim = hp.w_feamim > 0 and hp.feature_loss == "reference"
        if hp.w_mim <= 0 and not predictive_feamim:
            unused += [*decoder.blocks, decoder.norm, decoder.pixel_out, decoder.feature_out]
            if not reference_feamim:
                unused.append(decoder.embed)
                parameters.append(decoder.mask_token)
        else:
            if hp.w_mim <= 0:
                unused.append(decoder.pixel_out)
            if not predictive_feamim:
                unused.append(decoder.feature_out)
        if hp.w_mlm <= 0:
            unused.append(self.mlm_head)
        fusion = self.backbone.fusion
        layers = len(fusion.image_layers)
        image_at_last = (hp.w_mim > 0 or hp.w_feamim > 0) and self.backbone_config.decoder.mim_layer in (-1, layers)
        if hp.w_itm <= 0 and not image_at_last:
            unused.append(fusion.image_layers[-1])
        if hp.w_itm <= 0 and hp.w_mlm <= 0 and hp.w_feamlm <= 0:
            unused.append(fusion.text_layers[-1])
        return [p for module in unused for p in module.parameters()] + parameters

    # ------------------------------------------------------------------------------------------ teacher
    def on_fit_start(self) -> None:
        # The EMA teacher stays in eval mode on purpose; Lightning's notice about eval-mode modules (given next, as
        # the fit loop starts) would only alarm. Installed when a reconstruction stage fits, not when it is imported.
        warnings.filterwarnings("ignore", message=EVAL_MODE_NOTICE)
        # Resumed runs keep the restored teacher; fresh runs (also after `pretrained` loading) copy the student.
        if self.teacher is not None and self.trainer.ckpt_path is None:
            self.teacher.copy_from(self.backbone)

    def compile_modules(self, **options: Any) -> None:
        super().compile_modules(**options)
        self.mim_decoder.compile(**options)
        if self.teacher is not None:
            self.teacher.module.compile(**options)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.teacher is not None:
            self.teacher.update(self.backbone)

    # ------------------------------------------------------------------------------------------ losses
    def reconstruction_losses(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """All loss terms of one batch.

        Returns:
            (terms, metrics): the weighted total is ``terms["loss"]``; ``metrics`` holds accuracies.
        """
        hp = self.hparams
        pixels: Tensor = batch["pixel_values"]
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        batch_size = pixels.shape[0]
        patch = self.backbone_config.vision.patch_size
        grid = self.backbone.vision.grid_size(tuple(pixels.shape[-2:]))
        num_patches = grid[0] * grid[1]
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        need_image = hp.w_mim > 0 or hp.w_feamim > 0
        need_text = hp.w_mlm > 0 or hp.w_feamlm > 0

        keep, mask = random_masking(batch_size, num_patches, hp.mask_ratio_image, pixels.device, generator)
        embedded: dict[str, Tensor] = {}
        # A last evaluation batch of one sample has nothing to swap with: ITM is left out of that batch only.
        itm = hp.w_itm > 0 and (batch_size >= 2 or self.training)
        student_texts = self._student_texts(batch, need_image, need_text, itm)

        def student(keep_indices: Tensor | None) -> BackboneOutput:
            # The backbone's forward, step by step, keeping the first pass's tower outputs for the ITC term.
            image = self.backbone.embed_image(pixels, keep_indices)
            text = next(student_texts)
            embedded.setdefault("image", image)
            embedded.setdefault("text", text)
            return self.backbone.fuse(text, attention_mask, image)

        text_out: BackboneOutput | None = None
        image_out: BackboneOutput | None = None
        if need_image or need_text:
            if hp.mask_mode == "joint":
                text_out = image_out = student(keep)
            else:
                if need_text:
                    text_out = student(None)
                if need_image:
                    image_out = student(keep)

        teacher_out = self.teacher(pixels, input_ids, attention_mask) if self.teacher is not None else None
        mim_layer = self.backbone_config.decoder.mim_layer

        if need_image:
            student_tokens = fusion_layer(image_out.image_layers, mim_layer)
            pixel_pred, feature_pred = self.mim_decoder(student_tokens, keep, grid)
            if hp.w_mim > 0:
                target = normalized_pixel_targets(patchify(pixels, patch))
                terms["mim"] = losses.mim_loss(pixel_pred, target, mask)
            if hp.w_feamim > 0:
                teacher_tokens = fusion_layer(teacher_out.image_layers, mim_layer)
                if hp.feature_loss == "predictive":
                    target = losses.feature_target(teacher_tokens[:, 1:])
                    terms["feamim"] = losses.feature_mse(feature_pred, target, mask)
                else:
                    sequence = self.mim_decoder.insert_mask_tokens(
                        self.mim_decoder.embed(student_tokens), keep, num_patches
                    )
                    terms["feamim"] = losses.reference_feamim(self.mim_decoder.embed, sequence, teacher_tokens, mask)

        if need_text:
            labels = batch["mlm_labels"]
            if hp.w_mlm > 0:
                # The vocabulary projection only where tokens were masked: the rest would be discarded.
                masked = labels != losses.IGNORE_INDEX
                logits = self.mlm_head(text_out.text_feats[masked])
                terms["mlm"] = losses.mlm_loss(logits, labels[masked])
                metrics["mlm_acc"] = losses.mlm_accuracy(logits.detach(), labels[masked])
            if hp.w_feamlm > 0:
                if hp.feature_loss == "predictive":
                    prediction = self.feamlm_predictor(text_out.text_feats)
                    target = losses.feature_target(teacher_out.text_feats)
                    terms["feamlm"] = losses.feature_mse(prediction, target, labels != losses.IGNORE_INDEX)
                else:
                    terms["feamlm"] = losses.reference_feamlm(
                        self.feamlm_predictor, text_out.text_feats, teacher_out.text_feats
                    )

        if itm:
            itm_pixels, itm_labels = self.swap_images(pixels, generator)
            itm_out = self.backbone.fuse(next(student_texts), attention_mask, self.backbone.embed_image(itm_pixels))
            itm_logits = self.itm_head(itm_out.pooled)
            terms["itm"] = losses.itm_loss(itm_logits, itm_labels)
            metrics["itm_acc"] = (itm_logits.detach().argmax(-1) == itm_labels).float().mean()

        if self.itc_head is not None:
            if not embedded:  # no masked pass ran: the towers on the unmasked pair
                embedded = {
                    "image": self.backbone.embed_image(pixels),
                    "text": self.backbone.embed_text(input_ids, attention_mask),
                }
            # Gathered over the DDP processes only when training: evaluation batches need not line up across them.
            terms["itc"] = itc_term(
                self,
                self.itc_head,
                embedded["image"],
                embedded["text"],
                input_ids,
                attention_mask,
                gather=self.training,
            )
            metrics["itc_scale"] = self.itc_head.scale.detach()

        weights = {"mim": hp.w_mim, "mlm": hp.w_mlm, "feamim": hp.w_feamim, "feamlm": hp.w_feamlm}
        total = sum(hp.alpha * weights[name] * value for name, value in terms.items() if name in weights)
        if "itm" in terms:
            total = total + hp.w_itm * terms["itm"]
        if "itc" in terms:
            total = total + hp.itc_weight * terms["itc"]
        terms["loss"] = total
        return terms, metrics

    def _student_texts(self, batch: dict[str, Any], need_image: bool, need_text: bool, itm: bool) -> Iterator[Tensor]:
        """The embedded texts of the student's passes, in the order the passes run (masked text first, unmasked
        after), from one call of the text tower on all of them stacked along the batch.

        The tower treats each sample on its own, so this is what one call per pass computes (the dropout draws
        aside), with matrix products twice as tall and one weight gradient per step instead of one per pass
        added into the last (a ``small`` pre-training step has two such passes).
        """
        if self.hparams.mask_mode == "joint":
            ids = [batch["mlm_input_ids"]] if need_image or need_text else []
        else:
            ids = ([batch["mlm_input_ids"]] if need_text else []) + ([batch["input_ids"]] if need_image else [])
        if itm:
            ids.append(batch["input_ids"])
        if not ids:
            return iter(())
        mask = batch["attention_mask"]
        return iter(self.backbone.embed_text(torch.cat(ids), mask.repeat(len(ids), 1)).chunk(len(ids)))

    def swap_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Swap the image of a random ``itm_swap_prob`` share of the pairs for another sample's (never its own).

        Returns:
            (pixels, labels): labels are 1 for kept pairs and 0 for swapped ones.
        """
        batch_size = pixels.shape[0]
        if batch_size < 2:
            raise StageError("ITM needs at least 2 samples per batch to swap images; raise the batch size")
        device = pixels.device
        swap = torch.rand(batch_size, generator=generator, device=device) < self.hparams.itm_swap_prob
        # A shift in 1..B-1 modulo B is never 0, so no sample gets its own image back.
        shift = torch.randint(1, batch_size, (batch_size,), generator=generator, device=device)
        source = torch.arange(batch_size, device=device)
        source = torch.where(swap, (source + shift) % batch_size, source)
        return pixels[source], (~swap).long()

    # ------------------------------------------------------------------------------------------ loops
    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every sample of the batch was dropped (on_error: skip): no step
            return None
        terms, metrics = self.reconstruction_losses(batch)
        self.check_finite(terms)
        batch_size = batch["pixel_values"].shape[0]
        self.log_terms("train", {**terms, **metrics}, batch_size, prog_bar=False)
        self.log("train_loss", terms["loss"].detach(), batch_size=batch_size, prog_bar=True, logger=False)
        if self.teacher is not None:
            self.log("ema/momentum", self.teacher.momentum, batch_size=batch_size)
        return terms["loss"]

    @staticmethod
    def _eval_generator(batch: dict[str, Any], batch_idx: int) -> torch.Generator:
        return torch.Generator(device=batch["pixel_values"].device).manual_seed(batch_idx)

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        # A fixed generator per batch makes the masks, and so the validation losses, comparable across epochs.
        terms, metrics = self.reconstruction_losses(batch, self._eval_generator(batch, batch_idx))
        batch_size = batch["pixel_values"].shape[0]
        if "mim" in terms and "mlm_acc" in metrics:
            metrics["recon"] = terms["mim"] + (1.0 - metrics["mlm_acc"])
        self.log_terms("val", {**terms, **metrics}, batch_size, sync_dist=True)

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        terms, metrics = self.reconstruction_losses(batch, self._eval_generator(batch, batch_idx))
        self.log_terms("test", {**terms, **metrics}, batch["pixel_values"].shape[0], sync_dist=True)
