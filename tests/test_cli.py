"""The `umd` command: every YAML in configs/ parses, `fit` leaves a checkpoint, the stages chain through
`pretrained`, `predict` writes JSON lines, and configuration mistakes end in a one-line message."""

import json
from pathlib import Path

import pytest
import yaml

from umd_lightning.cli import build_cli, main
from umd_lightning.predict import Predictor
from umd_lightning.stages import StageError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"
# configs/experiments/ holds `umd experiment` specs, not stage configs (tests/test_experiment.py plans them).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "experiments") + sorted(
    (REPO / "src" / "umd_lightning" / "configs").rglob("*.yaml")
)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_print_config_parses_every_yaml(config, capsys):
    # Trainer files are added to a stage file with a second --config, as the README shows.
    configs = [REPO / "configs" / "pretrain" / "roco.yaml", config] if config.parent.name == "trainer" else [config]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *[arg for path in configs for arg in ("--config", str(path))], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    if config.parent.name == "trainer":
        assert printed["trainer"]["precision"] == "bf16-mixed" and printed["trainer"]["strategy"] == "ddp"
    assert printed["model"]["class_path"].startswith("umd_lightning.stages.")
    assert printed["data"]["class_path"].startswith("umd_lightning.data.")


def write_config(
    path: Path, model: dict, data: dict, trainer: dict | None = None, checkpoint: dict | None = None
) -> Path:
    config = {
        "seed_everything": 0,
        "model": model,
        "data": data,
        "trainer": {
            "max_steps": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(path.parent / path.stem),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(path.parent)},
            },
            **(trainer or {}),
        },
        "checkpoint": {
            "dirpath": str(path.parent / path.stem / "checkpoints"),
            "save_last": True,
            **(checkpoint or {}),
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_model(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": {"preset": "tiny", "lr": 1e-3, **init_args}}


def fixture_data(class_path: str, **init_args) -> dict:
    return {
        "class_path": class_path,
        "init_args": {"tokenizer": "minilm", "image_size": 32, "batch_size": 4, "num_workers": 0, **init_args},
    }


def pretrain_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "pretrain.yaml",
        tiny_model("umd_lightning.stages.MRPretrain"),
        fixture_data(
            "umd_lightning.data.PretrainDataModule", sources=[{"format": "roco", "root": str(FIXTURES / "roco")}]
        ),
        trainer={"limit_val_batches": 1},
    )


def last_checkpoint(root: Path) -> Path:
    found = sorted(root.rglob("last.ckpt"))
    assert found, f"no last.ckpt under {root}"
    return found[-1]


@pytest.mark.slow
def test_fit_leaves_a_checkpoint_then_test_runs_on_it(tmp_path):
    config = pretrain_config(tmp_path)
    main(["fit", "--config", str(config)])
    checkpoint = last_checkpoint(tmp_path / "pretrain")
    main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)])
    metrics = sorted(tmp_path.rglob("metrics.csv"))
    assert any("test/mim" in path.read_text() for path in metrics)


@pytest.mark.slow
def test_chain_pretrain_calib_finetune_test_predict(tmp_path):
    main(["fit", "--config", str(pretrain_config(tmp_path))])
    pretrained = last_checkpoint(tmp_path / "pretrain")

    calib = write_config(
        tmp_path / "calib.yaml",
        tiny_model("umd_lightning.stages.TDCalib", pretrained=str(pretrained)),
        fixture_data(
            "umd_lightning.data.VQADataModule", dataset="vqa_rad", root=str(FIXTURES / "vqa_rad"), mode="calib"
        ),
        trainer={"max_steps": 6, "val_check_interval": 3, "check_val_every_n_epoch": None},
        checkpoint={"monitor": "val/recon", "mode": "min", "save_last": True},
    )
    main(["fit", "--config", str(calib)])
    calibrated = last_checkpoint(tmp_path / "calib")

    finetune = write_config(
        tmp_path / "finetune.yaml",
        tiny_model("umd_lightning.stages.FineTune", pretrained=str(calibrated), head_lr_mult=5.0),
        fixture_data("umd_lightning.data.VQADataModule", dataset="vqa_rad", root=str(FIXTURES / "vqa_rad")),
        trainer={"max_steps": 6, "callbacks": [{"class_path": "umd_lightning.callbacks.GMCoord"}]},
        checkpoint={"monitor": "val/overall", "mode": "max", "save_last": True},
    )
    main(["fit", "--config", str(finetune)])
    tuned = last_checkpoint(tmp_path / "finetune")
    main(["test", "--config", str(finetune), "--ckpt_path", str(tuned)])
    logged = "".join(path.read_text() for path in tmp_path.rglob("metrics.csv"))
    for key in ("gm_coord/k_t", "gm_coord/k_v", "test/overall", "test/open", "test/closed"):
        assert key in logged

    out = tmp_path / "predictions.jsonl"
    main(["predict", "--config", str(finetune), "--ckpt_path", str(tuned), "--predictions.output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {"qid", "answer", "top5"} <= rows[0].keys() and len(rows[0]["top5"]) == 5
    main(
        ["predict", "--explain", "--config", str(finetune), "--ckpt_path", str(tuned), "--predictions.output", str(out)]
    )
    maps = sorted((tmp_path / "predictions_explanations").iterdir())
    assert len(maps) == 4 * len(rows) and {p.suffix for p in maps} == {".png", ".npy"}
    assert (tmp_path / "predictions_explanations" / f"{rows[0]['qid']}_rollout.png").is_file()

    predictor = Predictor.from_checkpoint(tuned)
    image = next((FIXTURES / "vqa_rad" / "VQA_RAD Image Folder").glob("*.jpg"))
    answers = predictor.answer(image, "is there a circle?")
    assert len(answers) == 5 and all(0.0 <= p <= 1.0 for _, p in answers)

    # A fine-tuned checkpoint is not a valid start for TD-Calib: one clear error, not a traceback.
    with pytest.raises(StageError, match="finetune checkpoint; calib starts from pretrain or calib"):
        build_cli(["fit", "--config", str(calib), "--model.init_args.pretrained", str(tuned)])


def test_config_mistakes_end_in_one_line(tmp_path, capsys):
    config = pretrain_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.preset", "huge"])
    assert exit_info.value.code == 2
    assert "unknown preset 'huge': choose one of ['base', 'small', 'tiny']" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.pretrained", str(tmp_path / "nope.ckpt")])
    assert exit_info.value.code == 2
    assert "pretrained checkpoint not found" in capsys.readouterr().err


def test_missing_data_and_unavailable_text_model_end_in_one_line(tmp_path, capsys):
    config = pretrain_config(tmp_path)
    missing = str(tmp_path / "no-roco")
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", str(config), "--data.init_args.sources", f'[{{"format": "roco", "root": "{missing}"}}]']
        )
    assert exit_info.value.code == 2
    assert "ROCO captions not found" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.init_args.tokenizer", str(tmp_path / "no-model")])
    assert exit_info.value.code == 2
    assert "could not be loaded" in capsys.readouterr().err


def test_version_and_help_list_the_other_commands(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"umd_lightning {version('umd_lightning')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    printed = capsys.readouterr().out
    for command in ("fit", "predict", "umd data check --config", "umd convert", "umd serve", "--explain"):
        assert command in printed, command
