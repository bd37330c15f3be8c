"""Pre-emption: SIGTERM (a scheduler, ``docker stop``) or Ctrl-C (SIGINT) during ``umd fit`` saves a resumable
``last.ckpt`` and exits 143 / 130, single-process and under 2-process DDP, and the README's resume command then
ends with exactly the weights of an uninterrupted run.

The signal is real: :class:`pipeline_helpers.SignalAtStep` makes rank 0 send it to itself right before a given
optimiser step, as an outside ``kill`` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_resume import STEPS, assert_same_training_state, load, pretrain_config, umd_fit, write_config

SIGNAL_AT = 5
"""Signalled before step 6 runs: that step completes, then the run stops and saves step 6 (checkpoints every 2
steps would otherwise hold step 4 only)."""


def signalled_config(run_dir: Path, signum: int, ddp: bool = False, group: bool = False, at: int = SIGNAL_AT) -> Path:
    path = write_config(run_dir, pretrain_config(run_dir), kill_at=None)
    config = yaml.safe_load(path.read_text())
    signal_args = {"step": at, "signum": int(signum), "group": group}
    config["trainer"]["callbacks"] = [{"class_path": "pipeline_helpers.SignalAtStep", "init_args": signal_args}]
    if group:
        # Workers, and more micro-batches to fetch after the signal than the workers have prefetched (one step is
        # the fixture's whole epoch): a worker killed by the signal makes those fetches fail.
        config["data"]["init_args"]["num_workers"] = 2
        config["trainer"]["accumulate_grad_batches"] = 5
    if ddp:
        config["trainer"].update(devices=2, strategy="ddp")
    path.write_text(yaml.safe_dump(config))
    return path


def resumable(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = []
    path.write_text(yaml.safe_dump(config))


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_exits_non_zero_and_resumes_exactly(tmp_path: Path, signum: int, code: int) -> None:
    reference = umd_fit(write_config(tmp_path / "reference", pretrain_config(tmp_path), kill_at=None))
    assert reference.returncode == 0, reference.stderr[-3000:]

    config = signalled_config(tmp_path / "stopped", signum)
    stopped = umd_fit(config)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "ckpt" / "last.ckpt"
    assert f"{signal.Signals(signum).name} at step {SIGNAL_AT + 1}: saved {last}" in stopped.stderr
    assert load(last)["global_step"] == SIGNAL_AT + 1

    resumable(config)
    resumed = umd_fit(config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(load(last), load(tmp_path / "reference" / "ckpt" / "last.ckpt"))


@pytest.mark.slow
def test_sigterm_at_the_last_step_finishes_the_fit_instead(tmp_path: Path) -> None:
    # Stopping after the last step would save a checkpoint that skipped the final validation, and a resumed run
    # would end at once without it (no best.ckpt for a monitored stage): the fit finishes and exits 0.
    config = signalled_config(tmp_path / "last", signal.SIGTERM, at=STEPS - 1)
    finished = umd_fit(config)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"SIGTERM at the fit's last step ({STEPS}): finishing it" in finished.stderr
    assert load(tmp_path / "last" / "ckpt" / "last.ckpt")["global_step"] == STEPS


@pytest.mark.slow
def test_sigterm_under_ddp_stops_every_rank_and_resumes(tmp_path: Path) -> None:
    config = signalled_config(tmp_path / "stopped", signal.SIGTERM, ddp=True)
    stopped = umd_fit(config)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "ckpt" / "last.ckpt"
    assert load(last)["global_step"] == SIGNAL_AT + 1

    resumable(config)
    resumed = umd_fit(config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load(last)["global_step"] == STEPS


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_still_saves(tmp_path: Path) -> None:
    """A scheduler signals every process of the job: the DataLoader workers ignore it, so the run still reaches the
    step boundary and saves (a worker killed by it would crash the run first)."""
    config = signalled_config(tmp_path / "stopped", signal.SIGTERM, group=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    stopped = subprocess.run(
        [sys.executable, "-m", "umd_lightning", "fit", "--config", str(config)],
        cwd=config.parent,
        env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group, so the signal reaches nothing else
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert load(tmp_path / "stopped" / "ckpt" / "last.ckpt")["global_step"] == SIGNAL_AT + 1
