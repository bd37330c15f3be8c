"""``umd experiment``: specs plan into shared stage runs, a tiny grid runs end to end through the real runner and
``umd`` subprocesses, survives two SIGKILLs of the runner (one mid-training, one at a run's start) without
repeating or losing a run, and its report is rebuilt from the saved results with hand-checked numbers."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from umd_lightning.errors import ConfigError
from umd_lightning.experiment import runner as runner_module
from umd_lightning.experiment.command import main
from umd_lightning.experiment.report import build_report
from umd_lightning.experiment.runner import Runner, detect_devices
from umd_lightning.experiment.spec import load_spec, make_plan
from umd_lightning.experiment.stats import T_975, paired_difference, summarize, t_quantile_975

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIXTURES = REPO / "tests" / "data"
SPECS = sorted((CONFIGS / "experiments").glob("*.yaml"))
TINY = [
    "--model.init_args.preset=tiny",
    "--data.init_args.tokenizer=minilm",
    "--data.init_args.num_workers=0",
    "--trainer.check_val_every_n_epoch=null",
    "--trainer.enable_model_summary=false",
]


def tiny_spec(kill_marker: Path) -> dict:
    """2 rows x 2 seeds on the VQA-RAD fixture, both rows from one shared MR-Pretrain run; every +gm_coord run
    carries a callback that SIGKILLs the runner at step 1 (only the first run to get there does)."""
    kill = {"class_path": "experiment_helpers.KillRunnerAtStep", "init_args": {"step": 1, "marker": str(kill_marker)}}
    return {
        "name": "tiny",
        "seeds": [0, 1],
        "pretrain": {
            "config": str(CONFIGS / "pretrain" / "roco.yaml"),
            "overrides": [
                *TINY,
                "--data.init_args.image_size=24",
                "--data.init_args.batch_size=4",
                "--trainer.accumulate_grad_batches=1",
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=2",
                f"--data.init_args.sources={json.dumps([{'format': 'roco', 'root': str(FIXTURES / 'roco')}])}",
            ],
        },
        "finetune": {
            "overrides": [
                *TINY,
                "--data.init_args.image_size=32",
                "--data.init_args.batch_size=8",
                "--trainer.max_steps=3",
                "--trainer.val_check_interval=3",
            ]
        },
        "datasets": {
            "vqa_rad": {
                "finetune": {
                    "config": str(CONFIGS / "finetune" / "vqa_rad.yaml"),
                    "overrides": [f"--data.init_args.root={FIXTURES / 'vqa_rad'}"],
                }
            }
        },
        "rows": {
            "mr_pretrain": {"pretrain": [], "finetune": ["--trainer.callbacks=[]"]},
            "+gm_coord": {
                "pretrain": [],
                "finetune": [f"--trainer.callbacks+={json.dumps(kill)}"],
                "baseline": "mr_pretrain",
            },
        },
    }


def start_runner(cwd: Path, spec: Path, out: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "umd_lightning", "experiment", "run", str(spec), "--out", str(out)]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_grid_killed_twice_resumes_and_reports(tmp_path: Path) -> None:
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "killed"), sort_keys=False))
    out = tmp_path / "out"
    plan = make_plan(load_spec(spec_path))
    # One pre-training for both rows and both seeds, then 4 fine-tuning runs.
    assert [run.stage for run in plan.runs] == ["pretrain"] + ["finetune"] * 4
    pretrain, *finetune = plan.runs
    assert all(run.upstream is pretrain for run in finetune)
    killed_mid_training, killed_at_start = finetune[2], finetune[3]  # +gm_coord seeds 0 and 1

    # 1) The first +gm_coord run SIGKILLs the runner at its step 1; its fit gets SIGTERM (parent-death signal).
    first = start_runner(tmp_path, spec_path, out)
    output, _ = first.communicate(timeout=900)
    assert first.returncode == -signal.SIGKILL, output
    finished_before = {run.folder: (out / run.folder / "DONE").stat().st_mtime for run in plan.runs[:3]}
    assert not (out / killed_mid_training.folder / "DONE").exists()

    # 2) Resume, then SIGKILL the runner as soon as it starts the last run (that fit has no checkpoint yet).
    second = start_runner(tmp_path, spec_path, out)
    lines = []
    for line in second.stdout:
        lines.append(line)
        if "start [5/5]" in line:
            second.send_signal(signal.SIGKILL)
            break
    second.wait(timeout=60)
    second.stdout.close()
    assert second.returncode == -signal.SIGKILL, "".join(lines)
    assert "[experiment] tiny: 4 results from 5 stage runs (1 pretrain, 4 finetune); 3 already finished" in lines[0]

    # 3) Resume to the end.
    third = start_runner(tmp_path, spec_path, out)
    output, _ = third.communicate(timeout=900)
    assert third.returncode == 0, output
    assert "2 already finished" not in output and "all 5 stage runs finished" in output

    # No finished run was run again, none is lost, and each interrupted one ran again exactly once more.
    for folder, mtime in finished_before.items():
        assert (out / folder / "DONE").stat().st_mtime == mtime
    starts = [e for e in events(out) if e["event"] == "start"]
    fit_starts = {run.key: [e for e in starts if e["run"] == run.key and e["phase"] == "fit"] for run in plan.runs}
    assert {key: len(found) for key, found in fit_starts.items()} == {
        run.key: 2 if run in (killed_mid_training, killed_at_start) else 1 for run in plan.runs
    }
    assert [e["resume"] for e in fit_starts[killed_mid_training.key]] == [False, True]
    assert [e["resume"] for e in fit_starts[killed_at_start.key]] == [False, False]
    assert sum(e["event"] == "done" for e in events(out)) == len(plan.runs)
    assert all(sum(e["phase"] == "test" for e in starts if e["run"] == run.key) == 1 for run in finetune)

    # The run killed mid-training continued from its checkpoint to the last step.
    resumed = out / killed_mid_training.folder
    assert "Restoring states from the checkpoint path" in (resumed / "fit-2.log").read_text()
    assert json.loads((resumed / "compute.json").read_text())["steps"] == 3
    for run in plan.runs:
        folder = out / run.folder
        info = json.loads((folder / "run.json").read_text())
        assert info["key"] == run.key and info["commands"]["fit"][3] == "fit"
        assert (folder / "config.yaml").is_file()
        compute = json.loads((folder / "compute.json").read_text())
        assert compute["wall_s"] > 0 and compute["steps"] == (2 if run.stage == "pretrain" else 3)
    assert (
        f"--model.init_args.pretrained={out / pretrain.folder}"
        in json.loads((out / finetune[0].folder / "run.json").read_text())["commands"]["fit"]
    )

    # The report, from the saved results only, against numbers computed here from the results files.
    overall = {
        (cell.row, cell.seed): json.loads((out / cell.run.folder / "test_results.json").read_text())["metrics"][
            "test/overall"
        ]
        for cell in plan.cells
    }
    _, report_dir = build_report(out)
    rows = {(r["row"], r["metric"]): r for r in read_csv(report_dir / "results.csv")}
    for row in ("mr_pretrain", "+gm_coord"):
        values = [overall[row, 0], overall[row, 1]]
        line = rows[row, "test/overall"]
        assert int(line["n"]) == 2
        assert math.isclose(float(line["mean"]), (values[0] + values[1]) / 2, abs_tol=1e-12)
        assert math.isclose(float(line["std"]), abs(values[0] - values[1]) / math.sqrt(2), abs_tol=1e-12)
    (paired,) = read_csv(report_dir / "paired.csv")
    diffs = [overall["+gm_coord", s] - overall["mr_pretrain", s] for s in (0, 1)]
    assert paired["row"] == "+gm_coord" and paired["baseline"] == "mr_pretrain" and int(paired["pairs"]) == 2
    assert math.isclose(float(paired["mean_diff"]), sum(diffs) / 2, abs_tol=1e-12)
    half = 12.7062 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)
    assert math.isclose(float(paired["ci95_high"]) - float(paired["ci95_low"]), 2 * half, abs_tol=1e-9)
    markdown = (report_dir / "report.md").read_text()
    assert "Evaluation: no leak" in markdown and "| +gm_coord − mr_pretrain | 2 |" in markdown
    assert (report_dir / "vqa_rad.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compute = read_csv(report_dir / "compute.csv")
    assert len(compute) == 5 and all(float(c["wall_s"]) > 0 for c in compute)


# ---------------------------------------------------------------------------------------------- plans and specs
@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_shipped_specs_plan_the_ablation_with_reuse(spec: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the specs' config paths are relative to the repository, as `umd` reads them
    plan = make_plan(load_spec(spec))
    seeds, datasets = len(plan.spec.seeds), len(plan.spec.datasets)
    assert seeds == 3 and list(plan.spec.rows) == ["no_pretrain", "data_level", "mr_pretrain", "+td_calib", "+gm_coord"]
    # Two pre-trainings (data-level and full) shared by every data set and seed; calib per data set and seed.
    assert plan.counts() == {"pretrain": 2, "calib": datasets * seeds, "finetune": 5 * datasets * seeds}
    runner = Runner(plan, Path("/tmp/never-written"), [None])
    by_cell = {(c.dataset, c.row, c.seed): c for c in plan.cells}
    for dataset in plan.spec.datasets:
        for seed in plan.spec.seeds:
            chain = {row: [run.stage for run in by_cell[dataset, row, seed].chain] for row in plan.spec.rows}
            assert chain == {
                "no_pretrain": ["finetune"],
                "data_level": ["pretrain", "finetune"],
                "mr_pretrain": ["pretrain", "finetune"],
                "+td_calib": ["pretrain", "calib", "finetune"],
                "+gm_coord": ["pretrain", "calib", "finetune"],
            }
            cell = {row: by_cell[dataset, row, seed] for row in plan.spec.rows}
            assert cell["+td_calib"].chain[1] is cell["+gm_coord"].chain[1]  # one calib for both rows
            assert cell["mr_pretrain"].chain[0] is cell["+gm_coord"].chain[0]
            assert cell["data_level"].chain[0] is not cell["mr_pretrain"].chain[0]
            commands = {row: " ".join(runner.command(cell[row].run, "fit")) for row in cell}
            assert "--model.init_args.pretrained=null" in commands["no_pretrain"]
            assert "--model.init_args.w_feamim=0 --model.init_args.w_feamlm=0" in " ".join(
                runner.command(cell["data_level"].chain[0], "fit")
            )
            assert all(("--trainer.callbacks=[]" in commands[row]) == (row != "+gm_coord") for row in commands)
            assert f"pretrained={runner.folder(cell['+gm_coord'].chain[1])}" in commands["+gm_coord"]


def test_run_key_follows_config_contents_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_spec(tmp_path / "marker")
    config = tmp_path / "finetune.yaml"
    config.write_text((CONFIGS / "finetune" / "vqa_rad.yaml").read_text())
    spec["datasets"]["vqa_rad"]["finetune"]["config"] = str(config)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    keys = [run.key for run in make_plan(load_spec(path)).runs]
    assert keys == [run.key for run in make_plan(load_spec(path)).runs]
    config.write_text(config.read_text() + "\n# an edit\n")
    edited = [run.key for run in make_plan(load_spec(path)).runs]
    assert edited[0] == keys[0] and set(edited[1:]).isdisjoint(keys[1:])  # the pre-training is unchanged
    spec["pretrain"]["overrides"].append("--trainer.max_steps=5")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert set(run.key for run in make_plan(load_spec(path)).runs).isdisjoint(edited)  # everything downstream too


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["rows"]["mr_pretrain"].update(pretrian=[]), "rows.mr_pretrain: unknown key 'pretrian'"),
        (lambda s: s.update(row={}), "unknown key 'row' (expected one of name, seeds"),
        (
            lambda s: s["datasets"]["vqa_rad"]["finetune"].update(config="configs/finetune/nope.yaml"),
            "datasets.vqa_rad.finetune.config: config file not found: configs/finetune/nope.yaml",
        ),
        (
            lambda s: s["rows"]["+gm_coord"].update(calib=[]),
            "rows.+gm_coord: runs calib but datasets.vqa_rad names no calib config",
        ),
        (lambda s: s["rows"]["+gm_coord"].update(baseline="nope"), "rows.+gm_coord.baseline: 'nope' is not a row"),
        (lambda s: s["rows"]["mr_pretrain"].update(finetune=["max_steps=3"]), "is not a umd argument of the form"),
    ],
)
def test_malformed_spec_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, edit, message: str) -> None:
    spec = tiny_spec(tmp_path / "marker")
    edit(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("umd experiment: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


class SleepingRunner(Runner):
    """The real scheduler with each phase a one-second process (fit) or one that writes a test result."""

    def command(self, run, phase: str, resume: bool = False) -> list[str]:
        script = (
            "import json, sys, time, pathlib; time.sleep(1.0); folder = pathlib.Path(sys.argv[1]); "
            "sys.argv[2] == 'test' and (folder / 'test_results.json').write_text("
            "json.dumps({'metrics': {'test/overall': 0.5}}))"
        )
        return [sys.executable, "-c", script, str(self.folder(run)), phase]


def test_cpu_slots_run_that_many_at_once_upstream_first(tmp_path: Path) -> None:
    assert detect_devices("cpu") == [None] and detect_devices("cpu:3") == [None, None, None]
    for bad in ("cpu:0", "cpu:two"):
        with pytest.raises(ConfigError, match="cpu:N takes a whole number"):
            detect_devices(bad)
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "marker"), sort_keys=False))
    plan = make_plan(load_spec(spec_path))
    lines: list[str] = []
    assert SleepingRunner(plan, tmp_path / "out", [None, None], echo=lines.append).run() == 0
    assert "to run on the CPU, 2 runs at a time" in lines[0]
    # Intervals of each run (first start to done): never more than two at once, and all four fine-tuning runs
    # start after the pre-training they build on is done.
    log = events(tmp_path / "out")
    start = {e["run"]: e["time"] for e in reversed(log) if e["event"] == "start"}
    done = {e["run"]: e["time"] for e in log if e["event"] == "done"}
    assert set(done) == {run.key for run in plan.runs}
    pretrain, *finetune = plan.runs
    assert all(start[run.key] >= done[pretrain.key] for run in finetune)
    running = [sum(start[r] <= start[k] < done[r] for r in start) for k in start]
    assert max(running) == 2  # two ran side by side, and never three


def test_a_full_disk_stops_the_grid_in_one_line_and_the_same_command_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "marker"), sort_keys=False))
    plan = make_plan(load_spec(spec_path))
    real_write_json = runner_module.write_json
    started: list[Path] = []

    def full_from_the_third_run(path: Path, value) -> None:
        if path.name == "run.json":
            started.append(path.parent)
            if len(set(started)) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_json(path, value)

    monkeypatch.setattr(runner_module, "write_json", full_from_the_third_run)
    lines: list[str] = []
    runner = SleepingRunner(plan, tmp_path / "out", [None, None], echo=lines.append)
    assert runner.run() == 1  # returns: no traceback
    assert lines[-1].startswith("[experiment] stopped: [Errno 28] No space left on device") and "run.json" in lines[-1]
    assert lines[-1].endswith("the same command resumes the grid")
    done_before = {run.key for run in plan.runs if runner_module.is_done(runner.folder(run))}
    assert plan.runs[0].key in done_before and len(done_before) < len(plan.runs)

    monkeypatch.setattr(runner_module, "write_json", real_write_json)
    again = SleepingRunner(plan, tmp_path / "out", [None, None], echo=lines.append)
    assert again.run() == 0  # the lock was released
    starts = [e["run"] for e in events(tmp_path / "out") if e["event"] == "start"]
    assert all(starts.count(key) == 1 for key in done_before)  # a finished run is not run again
    assert all(runner_module.is_done(again.folder(run)) for run in plan.runs)


# ---------------------------------------------------------------------------------------------- statistics
def test_t_quantiles_and_paired_interval_by_hand() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")  # a dev-only dependency here; the package uses the table
    for df in (*range(1, 31), 31, 40, 60, 120, 1000):
        assert math.isclose(t_quantile_975(df), scipy_stats.t.ppf(0.975, df), abs_tol=1e-4), df
    assert len(T_975) == 30 and T_975[1] == 4.3027
    summary = summarize([0.5, 0.7, 0.9])
    assert (summary.n, summary.mean) == (3, pytest.approx(0.7)) and summary.std == pytest.approx(0.2)
    assert summarize([0.4]).std is None
    # Differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3).
    paired = paired_difference([0.6, 0.8, 0.7], [0.5, 0.5, 0.5])
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert paired.mean == pytest.approx(0.2) and paired.std == pytest.approx(0.1)
    assert (paired.low, paired.high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert paired_difference([0.6], [0.5]).low is None
    assert statistics.fmean([paired.low, paired.high]) == pytest.approx(0.2)
