"""What every UMD stage shares: the backbone from a preset, parameter groups with lr multipliers, warm-up then
decay, loading a previous stage's weights with an exact key check, and a guard against non-finite losses."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from umd_lightning.errors import (
    NonFiniteLossError,
    StageError,
    check_range,
)
from umd_lightning.models.backbone import UMDBackbone
from umd_lightning.models.config import BackboneConfig, preset
from umd_lightning.runs import resolve_pretrained
from umd_lightning.weights import load_checkpoint_file

Schedule = Literal["linear", "cosine"]
OptimizerKernel = Literal["auto", "fused", "foreach", "for_loop"]
OPTIMIZER_KERNELS = ("auto", "fused", "foreach", "for_loop")

log = logging.getLogger("umd_lightning")


def random_towers_warning(preset_name: str, cfg: BackboneConfig) -> str | None:
    """The one-line warning for a ``base`` run whose towers start from random weights, else ``None``."""
    if preset_name != "base":
        return None
    random = []
    if not (cfg.vision.pretrained_path or cfg.vision.pretrained_hub):
        random.append("vision")
    if not cfg.text.pretrained:
        random.append("text")
    if not random:
        return None
    return (
        f"[umd] preset 'base': the {' and '.join(random)} tower{'s' if len(random) > 1 else ''} start"
        f"{'' if len(random) > 1 else 's'} from random weights; give OpenAI CLIP ViT-B/16 weights with "
        "`backbone_overrides: {vision.pretrained_path: ViT-B-16.pt}` (or vision.pretrained_hub: true online), "
        "text.pretrained: true for RoBERTa, or `pretrained:` a checkpoint (`umd convert` makes one from the authors')"
    )


POS_EMBED_KEY = "backbone.vision.vit.pos_embed"


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: Schedule):
    """Multiplier of the base lr at each optimiser step: linear warm-up over ``warmup_ratio`` of the steps, then
    linear or cosine decay to 0 at ``total_steps``."""
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


class UMDStage(pl.LightningModule):
    """Base of the MR-Pretrain, TD-Calib and fine-tuning stages.

    Args:
        preset: backbone size, ``tiny`` (tests), ``small`` (CPU) or ``base`` (the paper).
        backbone_overrides: dotted-key changes to the preset, e.g. ``{"fusion.layers": 4}``.
        text_model: the text tower and tokenizer (a local folder, ``minilm`` or a hub name); linked from the data's
            ``tokenizer`` by the CLI.
        image_size: input image side in pixels; linked from the data's ``image_size`` by the CLI.
        lr: base learning rate (pretrained towers).
        lr_mult: multiplier for the fusion layers, projections, poolers and type embeddings.
        head_lr_mult: multiplier for the heads.
        weight_decay: AdamW weight decay (none on biases and norm weights).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_ratio: fraction of the optimiser steps spent warming up.
        schedule: decay after warm-up, ``linear`` or ``cosine``.
        pretrained: a previous stage's checkpoint to start from (``--ckpt_path`` is only for resuming).
        optimizer_kernel: how AdamW runs its update: ``fused`` (one kernel per group on CPU and CUDA), ``foreach``
            (multi-tensor ops), ``for_loop`` (one parameter at a time, the reference's), or ``auto``: fused where
            every parameter is a floating-point tensor on the CPU or a CUDA device, else foreach. The three give
            the same update up to rounding.
        compile: ``torch.compile`` in place (``nn.Module.compile``: state-dict keys are unchanged) the modules every
            pass runs through: the backbone's towers and fusion (the EMA teacher's too) and the MIM decoder.
            ``true`` takes torch.compile's default backend (Inductor); a string names another backend
            (``aot_eager``, ``eager``: to tell a compiler fault from a model one). The first steps are slower while
            it compiles.
        gradient_checkpointing: recompute the towers' and fusion layers' activations in the backward pass instead
            of keeping them (less memory, more time), for ``base`` on small GPUs.
    """

    stage_name: str = "base"
    accepts_pretrained_from: tuple[str, ...] = ()
    """Stages whose checkpoints this stage may start from."""

    def __init__(
        self,
        preset: str = "small",
        backbone_overrides: dict[str, Any] | None = None,
        text_model: str | None = None,
        image_size: int | None = None,
        lr: float = 1e-5,
        lr_mult: float = 5.0,
        head_lr_mult: float = 5.0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        warmup_ratio: float = 0.1,
        schedule: Schedule = "linear",
        pretrained: str | None = None,
        optimizer_kernel: OptimizerKernel = "auto",
        compile: bool | str = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer_kernel not in OPTIMIZER_KERNELS:
            raise StageError(
                f"model.init_args.optimizer_kernel={optimizer_kernel!r}: choose from {', '.join(OPTIMIZER_KERNELS)}"
            )
        backends = torch.compiler.list_backends(exclude_tags=()) if isinstance(compile, str) else []
        if isinstance(compile, str) and compile not in backends:
            raise StageError(
                f"model.init_args.compile={compile!r} is not a torch.compile backend: give true (Inductor) or one of "
                f"{', '.join(backends)}"
            )
        check_range("model.init_args.lr", lr, low=0.0, low_open=True)
        check_range("model.init_args.warmup_ratio", warmup_ratio, low=0.0, high=1.0)
        check_range("model.init_args.weight_decay", weight_decay, low=0.0)
        self.backbone_config = self.make_backbone_config(preset, backbone_overrides, text_model, image_size)
        self.backbone = UMDBackbone(self.backbone_config)
        if gradient_checkpointing:
            self.backbone.set_gradient_checkpointing(True)
        self._pretrained_loaded = False
        self._compiled = False

    @staticmethod
    def make_backbone_config(
        preset_name: str, overrides: dict[str, Any] | None, text_model: str | None, image_size: int | None
    ) -> BackboneConfig:
        try:
            cfg = preset(preset_name, overrides)
        except (ValueError, KeyError) as exc:
            raise StageError(str(exc).strip("'\"")) from None
        if text_model is not None:
            cfg.text.name_or_path = text_model
        if image_size is not None:
            cfg.image_size = image_size
        patch = cfg.vision.patch_size
        if not isinstance(cfg.image_size, int) or cfg.image_size < patch or cfg.image_size % patch:
            nearest = max(patch, round(cfg.image_size / patch) * patch) if isinstance(cfg.image_size, int) else patch
            raise StageError(
                f"image_size={cfg.image_size} must be a positive multiple of the vision tower's patch size {patch} "
                f"(e.g. {nearest})"
            )
        return cfg

    def setup(self, stage: str) -> None:
        """Check what the model and the data must agree on before any step runs; compile when asked."""
        option = self.hparams.get("compile")
        if option and not self._compiled:
            self.compile_modules(**({"backend": option} if isinstance(option, str) else {}))
            self._compiled = True
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        max_length = getattr(datamodule, "max_text_length", None)
        limit = self.backbone.text.max_positions
        if max_length is not None and limit is not None and max_length > limit:
            raise StageError(
                f"data.init_args.max_text_length={max_length} exceeds the text tower's {limit} positions "
                f"({self.backbone_config.text.name_or_path}): use at most {limit}"
            )

    # ----------------------------------------------------------------------------------------------- optimiser
    def head_modules(self) -> list[nn.Module]:
        """Modules trained at ``lr * head_lr_mult``: every direct child but the backbone and the teacher."""
        return [m for name, m in self.named_children() if name not in ("backbone", "teacher")]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: (towers | rest of the backbone | heads) x (decay | no decay on biases and norms)."""
        hp = self.hparams
        tower_ids = {id(p) for m in self.backbone.tower_modules() for p in m.parameters()}
        head_ids = {id(p) for m in self.head_modules() for p in m.parameters()}
        groups: dict[tuple[str, bool], dict[str, Any]] = {}
        seen: set[int] = set()
        for name, param in self.named_parameters():
            if not param.requires_grad or name.startswith("teacher.") or id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in tower_ids:
                kind, mult = "tower", 1.0
            elif id(param) in head_ids:
                kind, mult = "head", hp.head_lr_mult
            else:
                kind, mult = "fusion", hp.lr_mult
            decay = param.ndim > 1 and not name.endswith(".bias")
            group = groups.setdefault(
                (kind, decay),
                {
                    "name": f"{kind}{'' if decay else '_no_decay'}",
                    "params": [],
                    "lr": hp.lr * mult,
                    "weight_decay": hp.weight_decay if decay else 0.0,
                },
            )
            group["params"].append(param)
        return list(groups.values())

    def compile_modules(self, **options: Any) -> None:
        """``torch.compile`` the backbone's towers and fusion in place (subclasses add their other large modules);
        ``options`` are ``torch.compile``'s (a backend, a mode)."""
        self.backbone.compile(**options)

    def make_optimizer(self) -> torch.optim.AdamW:
        """AdamW over :meth:`parameter_groups` with the kernel ``optimizer_kernel`` chooses (the parameters must
        be on their device already, as they are when Lightning calls ``configure_optimizers``)."""
        hp = self.hparams
        groups = self.parameter_groups()
        kernel = hp.get("optimizer_kernel", "auto")
        if kernel == "auto":
            params = [p for group in groups for p in group["params"]]
            fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
            kernel = "fused" if fusable else "foreach"
        options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[kernel]
        return torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, **options)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = self.make_optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, hp.warmup_ratio, hp.schedule))
        # "name" makes LearningRateMonitor (added by the CLI) log each group as lr/<group name>.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    # ------------------------------------------------------------------------------------- stage hand-off
    def configure_model(self) -> None:
        # Runs before Lightning restores a `--ckpt_path`, so a resumed run ends with the checkpoint's weights; only
        # when fitting, so testing or predicting a saved model never needs the previous stage's file.
        if self._trainer is None or self._pretrained_loaded or self.trainer.state.fn != "fit":
            return
        self._pretrained_loaded = True
        if self.trainer.ckpt_path is None and not self.hparams.pretrained:
            warning = random_towers_warning(self.hparams.preset, self.backbone_config)
            if warning is not None and self.global_rank == 0:
                log.warning(warning)
        if self.hparams.pretrained and self.trainer.ckpt_path is None:
            path = resolve_pretrained(self.hparams.pretrained)
            left_out, not_loaded = self.load_pretrained(path)
            rank_zero_info(
                f"[{self.stage_name}] loaded {path}: "
                f"{len(left_out)} checkpoint keys not used, {len(not_loaded)} keys of this stage start fresh"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["umd_stage"] = self.stage_name
        checkpoint["umd_backbone_config"] = self.backbone_config.to_dict()

    def pretrained_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes this stage takes from a previous stage's checkpoint."""
        return ("backbone.",)

    def optional_prefixes(self) -> tuple[str, ...]:
        """Prefixes among :meth:`pretrained_prefixes` that a previous stage's checkpoint may lack (they then keep
        their fresh initialisation, and the run says so in one line)."""
        return ()

    def load_pretrained(self, path: str | Path) -> tuple[list[str], list[str]]:
        """Load a previous stage's weights by key prefix, asserting the key sets match exactly.

        Every key of this module under :meth:`pretrained_prefixes` must come from the checkpoint with the same
        shape, and the checkpoint keys under those prefixes must all exist here.

        Returns:
            The checkpoint keys left out (other prefixes) and this module's keys not loaded (other prefixes).

        Raises:
            StageError: wrong stage, missing/unexpected keys or shape mismatches (first few named).
        """
        checkpoint = load_checkpoint_file(path)
        source_stage = checkpoint.get("umd_stage")
        if source_stage not in self.accepts_pretrained_from:
            raise StageError(
                f"{path} is a {source_stage or 'non-UMD'} checkpoint; {self.stage_name} starts from "
                f"{' or '.join(self.accepts_pretrained_from)} checkpoints"
            )
        source: Mapping[str, Tensor] = checkpoint["state_dict"]
        prefixes = self.pretrained_prefixes()
        own = self.state_dict()
        take = {k: v for k, v in source.items() if k.startswith(prefixes)}
        take = self._resample_position_embeddings(take, own, path)
        wanted = {k for k in own if k.startswith(prefixes)}
        for optional in self.optional_prefixes():
            if not any(k.startswith(optional) for k in take):
                wanted = {k for k in wanted if not k.startswith(optional)}
                rank_zero_warn(
                    f"[{self.stage_name}] {path} has no {optional.rstrip('.')}: it starts from a fresh initialisation"
                )
        missing = sorted(wanted - take.keys())
        unexpected = sorted(take.keys() - wanted)
        mismatched = [
            f"{k}: {tuple(take[k].shape)} vs {tuple(own[k].shape)}"
            for k in sorted(wanted & take.keys())
            if take[k].shape != own[k].shape
        ]
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        if problems:
            saved = checkpoint.get("umd_backbone_config")
            hint = (
                " The checkpoint's backbone config differs from this run's preset."
                if (saved is not None and saved != self.backbone_config.to_dict())
                else ""
            )
            raise StageError(f"{path} does not fit this {self.stage_name} model: {'; '.join(problems)}.{hint}")
        self.load_state_dict(take, strict=False)
        self.init_from_pretrained(source)
        left_out = sorted(k for k in source if not k.startswith(prefixes))
        not_loaded = sorted(k for k in own if not k.startswith(prefixes))
        return left_out, not_loaded

    def _resample_position_embeddings(
        self, take: dict[str, Tensor], own: Mapping[str, Tensor], path: str | Path
    ) -> dict[str, Tensor]:
        """Resample the vision tower's position embeddings of a checkpoint trained at another image size (MR-Pretrain
        at 288 px hands over to 384 px stages, UMD_SPEC 1.1); every other shape difference stays an error."""
        key = POS_EMBED_KEY
        if key not in take or key not in own or take[key].shape == own[key].shape:
            return take
        source, target = take[key], own[key]
        prefix = self.backbone.vision.num_prefix_tokens
        old_side = math.isqrt(source.shape[1] - prefix)
        new_side = math.isqrt(target.shape[1] - prefix)
        if (
            source.shape[0] != 1
            or source.shape[2] != target.shape[2]
            or old_side**2 != source.shape[1] - prefix
            or new_side**2 != target.shape[1] - prefix
        ):
            return take  # not a square grid of the same width: reported as a shape mismatch
        resampled = resample_abs_pos_embed(
            source.float(), new_size=[new_side, new_side], old_size=[old_side, old_side], num_prefix_tokens=prefix
        ).to(source.dtype)
        rank_zero_info(
            f"[{self.stage_name}] {path}: position embeddings resampled from a {old_side}x{old_side} to a "
            f"{new_side}x{new_side} patch grid ({old_side * self.backbone_config.vision.patch_size} -> "
            f"{new_side * self.backbone_config.vision.patch_size} px)"
        )
        return {**take, key: resampled}

    def init_from_pretrained(self, source: Mapping[str, Tensor]) -> None:
        """Hook after :meth:`load_pretrained`: initialise what this stage builds from other keys of the previous
        stage's checkpoint (``source`` is its whole state dict). Nothing by default."""

    # ------------------------------------------------------------------------------------------- helpers
    def check_finite(self, terms: Mapping[str, Tensor]) -> None:
        """Stop the run when a loss term is NaN or infinite, naming the step and the term.

        Raises:
            NonFiniteLossError: with the global step and the first non-finite term.
        """
        if not terms:
            return
        # One host synchronisation for all the terms (a per-term check would wait on the device once per term);
        # the terms are only looked at one by one when something is wrong.
        stacked = torch.stack([value.detach().float().reshape(-1).sum() for value in terms.values()])
        if bool(torch.isfinite(stacked).all()):
            return
        for name, value in terms.items():
            if not torch.isfinite(value.detach()).all():
                raise NonFiniteLossError(
                    f"loss term {name!r} is {value.item()} at global step {self.global_step} "
                    f"(epoch {self.current_epoch}); lower the lr, check the inputs, or try another precision"
                )

    def log_terms(self, prefix: str, terms: Mapping[str, Tensor], batch_size: int, **kwargs: Any) -> None:
        self.log_dict({f"{prefix}/{k}": v.detach() for k, v in terms.items()}, batch_size=batch_size, **kwargs)
