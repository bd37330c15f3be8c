"""The ``umd`` command: one LightningCLI for every stage (``fit`` / ``validate`` / ``test`` / ``predict``).

``umd fit --config configs/pretrain/roco.yaml [--config configs/trainer/gpu_ddp_bf16.yaml]``. The model and data
are chosen in YAML by ``class_path``; values only the data knows reach the model through argument links.
"""

from __future__ import annotations

import os
import sys

from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from umd_lightning.checkpointing import RunFolderGuard
from umd_lightning.data.common import DataError
from umd_lightning.errors import ConfigError
from umd_lightning.predict import JsonlPredictionWriter
from umd_lightning.stages.base import UMDStage


class UMDCLI(LightningCLI):
    """LightningCLI with the data -> model links every UMD stage needs, TensorBoard logs under ``runs/``, a
    ``checkpoint`` section (a ``ModelCheckpoint`` that keeps ``last.ckpt`` for resuming) and a ``RunFolderGuard``
    (output folders writable and the checkpoint folder locked before the first step)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunFolderGuard, "run_guard")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "trainer.default_root_dir": "runs",
                "trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="umd"),
                # Checkpoints are written to a temporary file and renamed: a crash never leaves a torn last.ckpt.
                "trainer.plugins": [{"class_path": "umd_lightning.checkpointing.AtomicCheckpointIO"}],
            }
        )
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.text_model")
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")


def build_cli(args: list[str] | None = None, run: bool = True) -> UMDCLI:
    """Parse ``args`` (``None``: ``sys.argv``) and, if ``run``, execute the subcommand. For notebooks and tests."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return UMDCLI(
        UMDStage,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``umd`` console script and ``python -m umd_lightning``: configuration and checkpoint
    mistakes end in a one-line message instead of a traceback.

    ``umd data check --config <yaml>`` scans a configuration's data without training (see ``data/check.py``).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:2] == ["data", "check"]:
        from umd_lightning.data.check import main as check_main

        raise SystemExit(check_main(argv[2:]))
    try:
        build_cli(args)
    except Exception as exc:
        cause = _user_error(exc)
        if cause is None:
            raise
        print(f"umd: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(exc: BaseException) -> BaseException | None:
    """The configuration or data mistake behind ``exc`` (jsonargparse wraps errors raised while instantiating)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError | DataError | FileNotFoundError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
