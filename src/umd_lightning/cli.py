"""The ``umd`` command: one LightningCLI for every stage (``fit`` / ``validate`` / ``test`` / ``predict``).

``umd fit --config configs/pretrain/roco.yaml [--config configs/trainer/gpu_ddp_bf16.yaml]``. The model and data
are chosen in YAML by ``class_path``; values only the data knows reach the model through argument links.

Every run writes into one stable folder (``run_dir``, see :mod:`umd_lightning.runs`): ``last.ckpt``,
``best.ckpt`` when a metric is monitored, and ``logs/``. Before anything heavy runs, the command checks what it
was given: ``--ckpt_path last`` / ``best`` resolve inside the run folder (one line when there is nothing to
resume), a checkpoint of another stage than the configured model is refused, a fresh ``fit`` never overwrites an
earlier run's checkpoints, and ``pretrained:`` must point at a checkpoint of a stage this one starts from.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from umd_lightning.callbacks.predictions import JsonlPredictionWriter
from umd_lightning.callbacks.preemption import FinalCheckpoint, Preemption, interrupted_by
from umd_lightning.checkpointing import RunFolderGuard, newest_readable_checkpoint
from umd_lightning.errors import ConfigError, DataError, StageError
from umd_lightning.quiet import known_warnings, quiet_trainer_init, replace_model_summary
from umd_lightning.runs import (
    BEST,
    LAST,
    checkpoint_stage,
    default_run_dir,
    describe_folder,
    evaluation_leaks,
    existing_checkpoints,
)
from umd_lightning.runs import resolve_pretrained as resolve_pretrained_path
from umd_lightning.seeds import global_seed
from umd_lightning.stages.base import UMDStage


class UMDCLI(LightningCLI):
    """LightningCLI with the data -> model links every UMD stage needs, one run folder per run (``run_dir``) with
    TensorBoard logs, a ``checkpoint`` section (a ``ModelCheckpoint`` that keeps ``last.ckpt`` for resuming) and a
    ``RunFolderGuard`` (output folders writable and the checkpoint folder locked before the first step)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Folder of this run's checkpoints (last.ckpt, best.ckpt) and logs; default runs/<stage>/<dataset>.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunFolderGuard, "run_guard")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                # A stable folder: a resumed run overwrites its own last.ckpt / best.ckpt instead of adding -v1 files.
                "checkpoint.enable_version_counter": False,
                "trainer.default_root_dir": None,
                "trainer.logger": None,
                # Checkpoints are written to a temporary file and renamed: a crash never leaves a torn last.ckpt.
                "trainer.plugins": [{"class_path": "umd_lightning.checkpointing.AtomicCheckpointIO"}],
            }
        )
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.text_model")
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")

    # ------------------------------------------------------------------------------------------ run folder
    def _subconfig(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        stage = _stage_class(config.model.class_path).stage_name if config.get("model") else "run"
        run_dir = config.get("run_dir") or config.checkpoint.dirpath
        if run_dir is None:
            run_dir = str(default_run_dir(stage, describe_folder(_plain(config.get("data")))))
        self.run_dir = Path(run_dir)
        config.run_dir = str(self.run_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(self.run_dir)
        if config.checkpoint.filename is None and config.checkpoint.monitor is not None:
            config.checkpoint.filename = Path(BEST).stem
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(self.run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(
                save_dir=str(self.run_dir), name="", version="logs", default_hp_metric=False
            )
        with quiet_trainer_init():
            trainer = super().instantiate_trainer(**kwargs)
        replace_model_summary(trainer.callbacks)
        trainer.callbacks += [Preemption(), FinalCheckpoint()]
        if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        return trainer

    # ------------------------------------------------------------------------------------------ checks
    def _checkpoint_folder(self) -> Path:
        return Path(self._subconfig().checkpoint.dirpath or self.run_dir)

    def _resolve_ckpt_path(self, subcommand: str) -> str | None:
        """Turn ``last`` / ``best`` into files of the run folder and check the file's stage against the model."""
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if ckpt_path is None:
            return None
        folder = self._checkpoint_folder()
        if ckpt_path in ("last", "best"):
            name = LAST if ckpt_path == "last" else BEST
            candidate = folder / name
            if ckpt_path == "last":
                candidate = self._resume_candidate(folder) or candidate
            if not candidate.is_file():
                what = "nothing to resume" if ckpt_path == "last" else "no best checkpoint"
                hint = "drop --ckpt_path to start a fresh run" if ckpt_path == "last" else "pass a checkpoint file"
                raise ConfigError(f"--ckpt_path {ckpt_path}: {what} in {folder} (no {name}): {hint}")
            ckpt_path = str(candidate)
        elif not Path(ckpt_path).is_file():
            raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        saved_stage = checkpoint_stage(ckpt_path)
        model = self.model
        if isinstance(model, UMDStage) and saved_stage != model.stage_name:
            raise StageError(
                f"--ckpt_path {ckpt_path} is a {saved_stage or 'non-UMD'} checkpoint but this config's model is "
                f"{type(model).__name__} ({model.stage_name}): use a {model.stage_name} checkpoint, or the config of "
                f"the stage that wrote it"
                + ("; to start from it, set model.init_args.pretrained instead" if subcommand == "fit" else "")
            )
        self.config_init[subcommand]["ckpt_path"] = ckpt_path
        rank_zero_info(f"[umd] {subcommand}: checkpoint {ckpt_path}")
        return ckpt_path

    @staticmethod
    def _resume_candidate(folder: Path) -> Path | None:
        """What ``--ckpt_path last`` resumes: the newer of ``last.ckpt`` and a SLURM requeue checkpoint, or, when
        ``last.ckpt`` is unreadable (a full disk, a truncated copy), the newest readable checkpoint of the folder."""
        hpc = _newest_hpc_checkpoint(folder)
        last = folder / LAST
        if hpc is not None and (not last.is_file() or hpc.stat().st_mtime > last.stat().st_mtime):
            return hpc
        if not last.is_file() and not existing_checkpoints(folder):
            return None
        readable = newest_readable_checkpoint(folder)
        if readable is not None and readable.name != LAST:
            rank_zero_warn(f"[umd] {last} is missing or unreadable: resuming from {readable}, the newest readable one")
        return readable

    def before_fit(self) -> None:
        ckpt_path = self._resolve_ckpt_path("fit")
        folder = self._checkpoint_folder()
        if ckpt_path is None:
            if isinstance(self.model, UMDStage) and self.model.hparams.pretrained:
                self.model.hparams.pretrained = str(self._check_pretrained(self.model))
            earlier = [p for p in existing_checkpoints(folder) if not p.name.startswith("hpc_ckpt_")]
            if earlier and _newest_hpc_checkpoint(folder) is None:
                raise ConfigError(
                    f"{folder} already holds checkpoints of an earlier run ({', '.join(p.name for p in earlier)}): "
                    "resume it with --ckpt_path last, write elsewhere with --run_dir, or delete the folder"
                )

    @staticmethod
    def _check_pretrained(model: UMDStage) -> Path:
        path = resolve_pretrained_path(model.hparams.pretrained)
        saved_stage = checkpoint_stage(path)
        if saved_stage not in model.accepts_pretrained_from:
            raise StageError(
                f"{path} is a {saved_stage or 'non-UMD'} checkpoint; {model.stage_name} starts from "
                f"{' or '.join(model.accepts_pretrained_from)} checkpoints (model.init_args.pretrained)"
            )
        rank_zero_info(f"[{model.stage_name}] starts from {path} ({saved_stage})")
        return path

    def before_validate(self) -> None:
        self._resolve_ckpt_path("validate")

    def before_test(self) -> None:
        self._resolve_ckpt_path("test")

    def before_predict(self) -> None:
        self._resolve_ckpt_path("predict")

    # ------------------------------------------------------------------------------------------ results
    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, subcommand: str) -> None:
        """Print the evaluation policy with the results and save both as ``<run_dir>/<subcommand>_results.json``."""
        notes = evaluation_leaks(self.model, self.datamodule)
        label = "LEAKY: " + "; ".join(notes) if notes else "no leak (no leaky evaluation option is set)"
        results = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.split("/")[0] in ("val", "test")}
        describe = getattr(self.model, "evaluation_protocol", None)
        protocol = describe() if callable(describe) else None
        if self.trainer.is_global_zero:
            print(f"[umd] {subcommand} evaluation: {label}")
            if protocol is not None:
                print(f"[umd] {subcommand} pairs scored by: {_protocol_line(protocol)}")
            record = {
                "subcommand": subcommand,
                "checkpoint": self.config_init[subcommand].get("ckpt_path"),
                "seed": global_seed(),
                "leaky": bool(notes),
                "leak_notes": notes,
                "metrics": results,
            }
            if protocol is not None:
                record["evaluation_protocol"] = protocol
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / f"{subcommand}_results.json").write_text(json.dumps(record, indent=2) + "\n")


def _protocol_line(protocol: dict[str, Any]) -> str:
    """One line for a retrieval evaluation's protocol, e.g. ``ITC top-32 re-scored by the cross-encoder (...)``."""
    if protocol.get("retrieval_top_k") is None:
        line = "the cross-encoder on every pair (retrieval_eval: exhaustive)"
    else:
        top_k = protocol["retrieval_top_k"]
        line = f"ITC cosine, the top {top_k} re-scored by the cross-encoder (retrieval_eval: topk)"
    if "pairs_cross_encoded" in protocol:
        line += f"; {protocol['pairs_cross_encoded']} of {protocol['pairs']} pairs fused"
    return line


def _newest_hpc_checkpoint(folder: Path) -> Path | None:
    """Lightning's SLURM requeue checkpoint (``hpc_ckpt_<n>.ckpt``) with the highest ``n``, if any."""
    found = [p for p in folder.glob("hpc_ckpt_*.ckpt") if p.stem.removeprefix("hpc_ckpt_").isdigit()]
    return max(found, key=lambda p: int(p.stem.removeprefix("hpc_ckpt_")), default=None)


def _stage_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"model.class_path {class_path!r} cannot be imported") from None


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


def build_cli(args: list[str] | None = None, run: bool = True) -> UMDCLI:
    """Parse ``args`` (``None``: ``sys.argv``) and, if ``run``, execute the subcommand. For notebooks and tests."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The run folder holds logs/ beside the checkpoints, and `fit` itself refuses to start over an earlier run's
    # checkpoints (see UMDCLI.before_fit): Lightning's "exists and is not empty" notice would only alarm.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    with known_warnings() if run else contextlib.nullcontext():
        return UMDCLI(
            UMDStage,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": OTHER_COMMANDS, "formatter_class": _HelpFormatter},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )


OTHER_COMMANDS = """other commands:
  umd data check --config <yaml> [--data.*]  scan a config's data without training (umd data check --help)
  umd data pack --config <yaml> --out DIR    pre-resized litdata shards of its sources (umd data pack --help)
  umd convert IN OUT                         the authors' checkpoints onto ours (umd convert --help)
  umd serve EXPORT_FOLDER                    a local web app on an exported model (umd serve --help)
  umd predict --explain ...                  also write explanation maps beside the predictions
  umd --version                              the installed version"""


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the epilog's lines kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``umd`` console script and ``python -m umd_lightning``: configuration and checkpoint
    mistakes end in a one-line message instead of a traceback; a fit stopped by SIGTERM / SIGINT exits with
    143 / 130 after saving ``last.ckpt``.

    ``umd data check --config <yaml>`` scans a configuration's data without training (see ``data/check.py``);
    ``umd data pack`` writes a pre-training config's sources as pre-resized shards (see ``data/pack.py``);
    ``umd convert`` converts a checkpoint of the authors' code (see ``convert.py``); ``umd experiment run`` /
    ``report`` runs a grid of stage runs and reports it (see ``experiment/``).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"umd_lightning {version('umd_lightning')}")
        raise SystemExit(0)
    if argv[:2] == ["data", "check"]:
        from umd_lightning.data.check import main as check_main

        raise SystemExit(check_main(argv[2:]))
    if argv[:2] == ["data", "pack"]:
        from umd_lightning.data.pack import main as pack_main

        raise SystemExit(pack_main(argv[2:]))
    if argv[:1] == ["experiment"]:
        from umd_lightning.experiment.command import main as experiment_main

        raise SystemExit(experiment_main(argv[1:]))
    if argv[:1] == ["convert"]:
        from umd_lightning.convert import main as convert_main

        raise SystemExit(convert_main(argv[1:]))
    if argv[:1] == ["serve"]:
        from umd_lightning.serve import main as serve_main

        raise SystemExit(serve_main(argv[1:]))
    if argv[:1] == ["predict"] and "--explain" in argv:  # maps beside the JSONL (umd_lightning/explain.py)
        argv = [a for a in argv if a != "--explain"] + ["--trainer.callbacks+=umd_lightning.explain.ExplanationWriter"]
        if args is None:
            sys.argv[1:] = argv
        else:
            args = argv
    try:
        build_cli(args)
    except SystemExit as exc:
        signum = interrupted_by()
        if signum is not None:
            raise SystemExit(128 + signum) from None
        raise exc
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
