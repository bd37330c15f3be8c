"""The paper's pipeline run as shipped: ``configs/pretrain/roco.yaml`` -> ``configs/calib/<set>.yaml`` ->
``configs/finetune/<set>.yaml`` -> ``umd test`` for VQA-RAD, ROCO retrieval and MELINDA classification, through the
``umd`` command in subprocesses, single-process and under 2-process DDP (the shipped
``configs/trainer/gpu_ddp_bf16.yaml`` with the accelerator set to CPU).

Only what a CPU forces is overridden: the preset (``tiny``), the tokenizer (``minilm``: nothing downloads), the data
roots (the committed fixtures), batch sizes and workers, and step counts. The image sizes keep the YAMLs' ratio
(288 px pre-training -> 384 px downstream becomes 24 -> 32 px, both multiples of the tiny patch) and every hand-off
path (``run_dir``, ``pretrained:``) is the YAML's own, resolved inside the test's working folder. Each stage of the
VQA chain is then resumed with the README's command (``--ckpt_path last``) and must continue from its step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIXTURES = REPO / "tests" / "data"
STEPS = 3
DDP = ["--config", str(CONFIGS / "trainer" / "gpu_ddp_bf16.yaml"), "--trainer.accelerator", "cpu"]
DDP += ["--trainer.devices", "2"]


def scaled_image_size(config: Path) -> int:
    """The config's image size scaled by 32/384, so 288 -> 24 and 384 -> 32 (the YAMLs' ratio is kept)."""
    size = yaml.safe_load(config.read_text())["data"]["init_args"]["image_size"]
    scaled = size * 32 // 384
    assert scaled * 384 == size * 32 and scaled % 8 == 0, f"{config}: {size} px does not scale to the tiny patch"
    return scaled


def cpu_overrides(config: Path, data: list[str], batch_size: int, steps: int = STEPS) -> list[str]:
    return [
        "--config", str(config),
        "--model.init_args.preset", "tiny",
        "--data.init_args.tokenizer", "minilm",
        "--data.init_args.image_size", str(scaled_image_size(config)),
        "--data.init_args.batch_size", str(batch_size),
        "--data.init_args.num_workers", "0",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(STEPS),
        "--trainer.check_val_every_n_epoch", "null",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        *data,
    ]  # fmt: skip


def umd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "umd_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"umd {' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    return result


def dump(folder: Path) -> list[str]:
    callback = {"class_path": "pipeline_helpers.DumpParameters", "init_args": {"folder": str(folder)}}
    return [f"--trainer.callbacks+={json.dumps(callback)}"]


def assert_replicas_identical(folder: Path) -> None:
    rank0, rank1 = (torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    different = [name for name in rank0 if not torch.equal(rank0[name], rank1[name])]
    assert not different, f"DDP replicas differ in {different[:5]}"


def step_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])


PRETRAIN = CONFIGS / "pretrain" / "roco.yaml"
ROCO_SOURCES = ["--data.init_args.sources", json.dumps([{"format": "roco", "root": str(FIXTURES / "roco")}])]
CHAINS = {
    "vqa_rad": (["--data.init_args.root", str(FIXTURES / "vqa_rad")], 8),
    # The fixture holds 9 distinct training captions, fewer than the shipped 16 candidates per image.
    "roco": (["--data.init_args.root", str(FIXTURES / "roco"), "--data.init_args.num_candidates", "4"], 4),
    "melinda": (["--data.init_args.root", str(FIXTURES / "melinda")], 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "ddp"])
def test_shipped_configs_chain_hand_off_and_resume(tmp_path: Path, mode: str) -> None:
    extra = DDP if mode == "ddp" else []
    probe = tmp_path / "replicas"

    def check_replicas(stage: str) -> None:
        if mode == "ddp":
            assert_replicas_identical(probe / stage)

    # MR-Pretrain at 24 px (the YAML's 288), gradient accumulation 8 as shipped.
    pretrain = cpu_overrides(PRETRAIN, ROCO_SOURCES, batch_size=4)
    umd(tmp_path, "fit", *pretrain, *extra, *dump(probe / "pretrain"))
    pretrained = tmp_path / "runs" / "pretrain" / "roco" / "last.ckpt"
    assert step_of(pretrained) == STEPS
    assert (tmp_path / "runs" / "pretrain" / "roco" / "logs").is_dir()
    check_replicas("pretrain")

    for name, (data, batch_size) in CHAINS.items():
        calib_config, finetune_config = CONFIGS / "calib" / f"{name}.yaml", CONFIGS / "finetune" / f"{name}.yaml"
        calib = cpu_overrides(calib_config, data, batch_size)
        out = umd(tmp_path, "fit", *calib, *extra, *dump(probe / f"calib_{name}"))
        # The 288 px checkpoint starts a 384 px stage: position embeddings resampled, nothing else.
        assert "starts from runs/pretrain/roco/last.ckpt (pretrain)" in out.stderr
        assert "position embeddings resampled from a 3x3 to a 4x4 patch grid (24 -> 32 px)" in out.stderr
        assert "has no itm_head" not in out.stderr
        calibrated = tmp_path / "runs" / "calib" / name / "best.ckpt"
        assert calibrated.is_file() and (calibrated.parent / "last.ckpt").is_file()
        check_replicas(f"calib_{name}")

        finetune = cpu_overrides(finetune_config, data, batch_size)
        out = umd(tmp_path, "fit", *finetune, *extra, *dump(probe / f"finetune_{name}"))
        assert f"starts from runs/calib/{name}/best.ckpt (calib)" in out.stderr
        # The ITM head passed through TD-Calib, so the retrieval head starts from it.
        assert "the retrieval head starts random" not in out.stderr
        check_replicas(f"finetune_{name}")

        out = umd(tmp_path, "test", *finetune, *extra, "--ckpt_path", "best")
        results = json.loads((tmp_path / "runs" / "finetune" / name / "test_results.json").read_text())
        assert results["checkpoint"] == str(Path("runs") / "finetune" / name / "best.ckpt")
        assert not results["leaky"] and "no leak" in out.stdout
        if name == "vqa_rad":
            # 11 test questions on 2 ranks: each counted once (a padding sampler would count 12).
            assert results["metrics"]["test/n"] == 11
        elif name == "roco":
            assert {"test/i2t_r1", "test/t2i_r10"} <= results["metrics"].keys()
        else:
            assert "test/acc" in results["metrics"]

    # The README's resume command continues each VQA stage from its last.ckpt (3 -> 5 steps).
    data, batch_size = CHAINS["vqa_rad"]
    for stage, config, stage_data in (
        ("pretrain", PRETRAIN, ROCO_SOURCES),
        ("calib", CONFIGS / "calib" / "vqa_rad.yaml", data),
        ("finetune", CONFIGS / "finetune" / "vqa_rad.yaml", data),
    ):
        args = cpu_overrides(config, stage_data, batch_size if stage != "pretrain" else 4, steps=STEPS + 2)
        last = tmp_path / "runs" / stage / ("roco" if stage == "pretrain" else "vqa_rad") / "last.ckpt"
        out = umd(tmp_path, "fit", *args, *extra, "--ckpt_path", "last")
        assert f"fit: checkpoint {last.relative_to(tmp_path)}" in out.stderr
        assert "Restoring states from the checkpoint path" in out.stderr
        assert step_of(last) == STEPS + 2, stage


@pytest.mark.slow
def test_pretrain_reference_feature_loss_and_separate_masks_under_ddp(tmp_path: Path) -> None:
    """The options the chain does not take: M3AE's two masked passes and the authors' feature losses (whose FeaMIM
    reaches no encoder) train under the shipped DDP config without unused-parameter errors."""
    args = cpu_overrides(PRETRAIN, ROCO_SOURCES, batch_size=4, steps=2)
    options = ["--model.init_args.feature_loss", "reference", "--model.init_args.mask_mode", "separate"]
    umd(tmp_path, "fit", *args, *options, *DDP, *dump(tmp_path / "replicas"))
    assert_replicas_identical(tmp_path / "replicas")
    assert step_of(tmp_path / "runs" / "pretrain" / "roco" / "last.ckpt") == 2
