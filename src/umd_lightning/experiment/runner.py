"""``umd experiment run``: execute a plan's stage runs through the ``umd`` command, resumably.

Every stage run has its own folder under ``<out>/runs/<stage>/<dataset>/<key>/`` (see :mod:`.spec`), which is also
its ``--run_dir``, holding what ``umd`` writes there (checkpoints, ``logs/``, ``test_results.json``) and what the
runner writes:

* ``run.json``: the run's inputs (config, overrides, seed, upstream run) and the exact commands;
* ``config.yaml``: the resolved config of its ``fit`` (LightningCLI's, copied from ``logs/``);
* ``<phase>-<attempt>.log``: each command's output; ``attempts.jsonl``: when each attempt started and ended;
* ``<phase>.done``: the phase (``fit``, then ``test`` for fine-tuning) ended with exit status 0;
* ``compute.json`` (wall time per phase, CPU seconds, attempts, optimiser steps, device) and, written
  atomically after it, ``DONE``: the run is finished and is never run again.

The runner can be killed at any moment. Its children are asked to stop with SIGTERM when it dies (Linux's
parent-death signal), so ``fit`` saves ``last.ckpt`` at the next batch boundary; the next ``umd experiment run``
waits for such a leftover child, resumes an unfinished ``fit`` with ``--ckpt_path=last`` when its folder holds a
checkpoint and starts it afresh otherwise, re-runs an unfinished ``test``, and skips every run with ``DONE``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from filelock import FileLock, Timeout

from umd_lightning.errors import ConfigError
from umd_lightning.experiment.spec import Plan, StageRun
from umd_lightning.runs import LAST, existing_checkpoints

DONE = "DONE"
GRID = "grid.json"
EVENTS = "events.jsonl"
ATTEMPTS = "attempts.jsonl"
COMPUTE = "compute.json"
RUN_INFO = "run.json"
TEST_RESULTS = "test_results.json"
LOCK = ".experiment.lock"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.2


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def phases(run: StageRun) -> tuple[str, ...]:
    """The ``umd`` subcommands a stage run consists of."""
    return ("fit", "test") if run.stage == "finetune" else ("fit",)


def _ask_to_stop_with_parent(parent: int) -> None:
    """In the child, before ``exec``: get SIGTERM when the runner (pid ``parent``) dies, even by SIGKILL, so a
    ``fit`` saves its checkpoint and ends instead of running on unattended."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the runner died before the signal was armed
        os._exit(143)


def detect_devices(choice: str) -> list[str | None]:
    """The slots runs are spread over: GPU ids (one run per device), or ``None`` per concurrent CPU run.

    ``auto``: the ids in ``CUDA_VISIBLE_DEVICES`` or every GPU torch sees, else the CPU; ``cpu``: one run at a time;
    ``cpu:N``: N runs at once on the CPU (with ``OMP_NUM_THREADS=1``, one per core); ``0,1``: these GPUs.
    """
    if choice == "cpu":
        return [None]
    if choice.startswith("cpu:"):
        count = choice.removeprefix("cpu:")
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--devices {choice!r}: cpu:N takes a whole number of runs at once, such as cpu:2")
        return [None] * int(count)
    if choice != "auto":
        ids = [part.strip() for part in choice.split(",") if part.strip()]
        if not ids:
            raise ConfigError(f"--devices {choice!r}: give auto, cpu or GPU ids such as 0,1")
        return list(ids)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [part.strip() for part in visible.split(",") if part.strip()] or [None]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())] or [None]


def checkpoint_summary(folder: Path) -> dict[str, Any]:
    """Optimiser steps of the final ``last.ckpt`` and the best monitored value it records (``None`` if none)."""
    import torch

    path = folder / LAST
    if not path.is_file():
        return {"steps": None, "monitor": None, "best": None}
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    summary: dict[str, Any] = {"steps": int(checkpoint.get("global_step", 0)), "monitor": None, "best": None}
    for name, state in (checkpoint.get("callbacks") or {}).items():
        monitored = state.get("monitor") and state.get("best_model_score") is not None
        if str(name).startswith("ModelCheckpoint") and monitored:
            summary["monitor"] = state["monitor"]
            summary["best"] = float(state["best_model_score"])
    return summary


def read_attempts(folder: Path) -> list[dict[str, Any]]:
    """The attempts recorded in ``attempts.jsonl``, each with its ``end`` and ``rc`` when it ended normally."""
    path = folder / ATTEMPTS
    attempts: dict[tuple[str, int], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by a kill is simply left out
                record = json.loads(line)
                attempts.setdefault((record["phase"], record["attempt"]), {}).update(record)
    return list(attempts.values())


def attempt_seconds(folder: Path, attempt: dict[str, Any]) -> float:
    """An attempt's wall time; for one whose runner was killed, until its log was last written."""
    end = attempt.get("end")
    if end is None:
        log = folder / attempt["log"]
        end = log.stat().st_mtime if log.is_file() else attempt["start"]
    return max(0.0, float(end) - float(attempt["start"]))


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as stream:
        stream.write(json.dumps(record) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


@dataclass
class Active:
    """A command of a stage run in flight on one slot."""

    run: StageRun
    index: int
    phase: str
    attempt: int
    process: subprocess.Popen
    log: TextIO
    device: str | None


class Runner:
    """Runs a plan's stage runs, upstream first, one per slot, each phase as a ``python -m umd_lightning``
    subprocess in the current folder (where the spec's relative config paths are read).

    Args:
        plan: the resolved grid.
        out: the experiment folder.
        devices: slots (see :func:`detect_devices`).
        echo: where the progress lines go.
    """

    def __init__(self, plan: Plan, out: Path, devices: list[str | None], echo: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.out = out.resolve()
        self.devices = devices
        self.echo = echo
        self.index = {run.key: number for number, run in enumerate(plan.runs, start=1)}
        self.stopping: int | None = None
        self._active: dict[int, Active] = {}
        """The phases in flight, by slot."""

    # -------------------------------------------------------------------------------------- files
    def folder(self, run: StageRun) -> Path:
        return self.out / run.folder

    def command(self, run: StageRun, phase: str, resume: bool = False) -> list[str]:
        """The ``umd`` command of one phase of ``run`` (``resume``: continue the fit from its ``last.ckpt``)."""
        args = [sys.executable, "-m", "umd_lightning", phase, f"--config={run.config}", *run.overrides]
        args += [f"--seed_everything={run.seed}", f"--run_dir={self.folder(run)}"]
        if run.stage != "pretrain":
            upstream = str(self.folder(run.upstream)) if run.upstream is not None else "null"
            args.append(f"--model.init_args.pretrained={upstream}")
        args.append("--trainer.enable_progress_bar=false")
        if phase == "test":
            args.append(f"--ckpt_path={self.plan.spec.test_checkpoint}")
        elif resume:
            args.append("--ckpt_path=last")
        return args

    def write_grid(self) -> None:
        """``grid.json``: the spec, every stage run and every cell, so ``umd experiment report`` needs nothing else."""
        spec = self.plan.spec
        grid = {
            "name": spec.name,
            "spec": str(spec.path),
            "seeds": list(spec.seeds),
            "shared_stages": sorted(spec.shared_stages),
            "test_checkpoint": spec.test_checkpoint,
            "datasets": {name: {"metric": d.metric} for name, d in spec.datasets.items()},
            "rows": {name: {"stages": list(r.stages), "baseline": r.baseline} for name, r in spec.rows.items()},
            "runs": {
                run.key: {
                    "folder": str(run.folder),
                    "stage": run.stage,
                    "dataset": run.dataset,
                    "seed": run.seed,
                    "rows": run.rows,
                    "upstream": run.upstream.key if run.upstream is not None else None,
                }
                for run in self.plan.runs
            },
            "cells": [{"dataset": c.dataset, "row": c.row, "seed": c.seed, "run": c.run.key} for c in self.plan.cells],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / GRID, grid)
        shutil.copyfile(spec.path, self.out / "spec.yaml")

    def _event(self, event: str, run: StageRun, **fields: Any) -> None:
        _append_line(self.out / EVENTS, {"time": time.time(), "event": event, "run": run.key, **fields})

    # -------------------------------------------------------------------------------------- one phase
    def _next_phase(self, run: StageRun) -> str | None:
        folder = self.folder(run)
        return next((p for p in phases(run) if not (folder / f"{p}.done").is_file()), None)

    def _wait_for_leftover(self, folder: Path) -> None:
        """A child of a killed runner may still be saving its checkpoint: wait until it has ended."""
        for attempt in read_attempts(folder):
            pid = attempt.get("pid")
            if attempt.get("end") is None and pid and _alive(pid):
                self.echo(f"[experiment] waiting for pid {pid}, left running in {folder} by an earlier runner")
                while _alive(pid):
                    time.sleep(_POLL_S)

    def _start(self, run: StageRun, device: str | None) -> Active:
        folder = self.folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        self._wait_for_leftover(folder)
        phase = self._next_phase(run)
        assert phase is not None
        resume = phase == "fit" and bool(existing_checkpoints(folder))
        if phase == "fit" and not resume:  # a clean start: no TensorBoard files of an attempt that saved nothing
            shutil.rmtree(folder / "logs", ignore_errors=True)
        command = self.command(run, phase, resume)
        previous = [a for a in read_attempts(folder) if a["phase"] == phase]
        attempt = 1 + max((a["attempt"] for a in previous), default=0)
        write_json(
            folder / RUN_INFO,
            {
                "key": run.key,
                "stage": run.stage,
                "dataset": run.dataset,
                "seed": run.seed,
                "rows": run.rows,
                "config": str(run.config),
                "overrides": list(run.overrides),
                "upstream": {"key": run.upstream.key, "folder": str(self.folder(run.upstream))}
                if run.upstream is not None
                else None,
                "cwd": str(Path.cwd()),
                "commands": {p: self.command(run, p) for p in phases(run)},
                "resume_command": self.command(run, "fit", resume=True),
            },
        )
        log_name = f"{phase}-{attempt}.log"
        log = open(folder / log_name, "w")  # noqa: SIM115 (closed when the phase ends, in _finish_phase)
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        arm = functools.partial(_ask_to_stop_with_parent, os.getpid())
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=arm)
        record = {"phase": phase, "attempt": attempt, "start": time.time(), "pid": process.pid, "log": log_name}
        _append_line(folder / ATTEMPTS, {**record, "device": device or "cpu", "resume": resume})
        self._event("start", run, phase=phase, attempt=attempt, resume=resume)
        if phase == phases(run)[0] or resume:
            how = " (resumed from its last.ckpt)" if resume else ""
            where = f" on GPU {device}" if device is not None else ""
            self.echo(f"[experiment] start [{self.index[run.key]}/{len(self.plan.runs)}] {run.describe()}{where}{how}")
        return Active(run, self.index[run.key], phase, attempt, process, log, device)

    def _finish_phase(self, active: Active, rc: int, cpu_s: float) -> bool:
        """Record how a phase ended (with the CPU seconds its process tree used); ``True`` when it succeeded."""
        run, folder = active.run, self.folder(active.run)
        active.log.close()
        ended = {"phase": active.phase, "attempt": active.attempt, "end": time.time(), "rc": rc, "cpu_s": cpu_s}
        _append_line(folder / ATTEMPTS, ended)
        if rc == 0 and active.phase == "test" and not (folder / TEST_RESULTS).is_file():
            rc = -1
        if rc != 0:
            self._event("fail", run, phase=active.phase, attempt=active.attempt, rc=rc)
            if self.stopping is None:
                last = _last_line(folder / f"{active.phase}-{active.attempt}.log")
                self.echo(
                    f"[experiment] FAILED [{active.index}/{len(self.plan.runs)}] {run.describe()}: "
                    f"umd {active.phase} exited {rc} ({last}); see {folder / f'{active.phase}-{active.attempt}.log'}"
                )
            return False
        if active.phase == "fit":
            resolved = folder / "logs" / "config.yaml"
            if resolved.is_file():
                shutil.copyfile(resolved, folder / "config.yaml")
        write_atomic(folder / f"{active.phase}.done", "")
        self._event("finish", run, phase=active.phase, attempt=active.attempt)
        return True

    def _finish_run(self, run: StageRun) -> None:
        folder = self.folder(run)
        attempts = read_attempts(folder)
        seconds = {
            phase: round(sum(attempt_seconds(folder, a) for a in attempts if a["phase"] == phase), 2)
            for phase in phases(run)
        }
        summary = checkpoint_summary(folder)
        cpu = [a.get("cpu_s") for a in attempts]
        compute = {
            "wall_s": round(sum(seconds.values()), 2),
            **{f"{p}_s": s for p, s in seconds.items()},
            # CPU seconds of the run's processes (DataLoader workers included); None when an attempt was killed
            # with its runner, whose CPU time is not known.
            "cpu_s": round(sum(cpu), 2) if None not in cpu else None,
            "attempts": {p: sum(a["phase"] == p for a in attempts) for p in phases(run)},
            "steps": summary["steps"],
            "devices": sorted({str(a.get("device")) for a in attempts if "device" in a}),
        }
        write_json(folder / COMPUTE, compute)
        figure = self.figure(run, summary)
        write_json(folder / DONE, {"key": run.key, "finished": time.time(), "figure": figure})
        self._event("done", run)
        steps = f", {summary['steps']} steps" if summary["steps"] is not None else ""
        self.echo(
            f"[experiment] done  [{self.index[run.key]}/{len(self.plan.runs)}] {run.describe()}: {figure} "
            f"({compute['wall_s']:.0f} s{steps})"
        )

    def figure(self, run: StageRun, summary: dict[str, Any]) -> str:
        """The run's headline number: the data set's test metric for fine-tuning, else the best monitored value."""
        if run.stage == "finetune":
            metric = self.plan.spec.datasets[run.dataset].metric
            results = json.loads((self.folder(run) / TEST_RESULTS).read_text())
            value = results["metrics"].get(metric)
            return f"{metric} {value:.4f}" if value is not None else f"{metric} missing from {TEST_RESULTS}"
        if summary["best"] is not None:
            return f"best {summary['monitor']} {summary['best']:.4f}"
        return "trained"

    # -------------------------------------------------------------------------------------- the grid
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = signum
        for active in self._active.values():
            with contextlib.suppress(ProcessLookupError):
                active.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Run every unfinished stage run; 0 when all finished, 1 when some failed or the runner could not write its
        own files (a full disk: one line, the children stopped, the grid resumable), 128 + signal when stopped."""
        self.out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.out / LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ConfigError(f"{self.out} is in use by another `umd experiment run` (its {LOCK} is held)") from None
        try:
            return self._run_grid()
        except OSError as error:  # the runner's own files: a full disk, a folder it may not write
            self._stop_children()
            self.echo(
                f"[experiment] stopped: {error}. Finished runs are kept; once this is fixed (e.g. space freed), "
                "the same command resumes the grid"
            )
            return 1
        finally:
            lock.release()

    def _stop_children(self) -> None:
        """SIGTERM every phase in flight (each saves ``last.ckpt`` if it can) and wait for it to end."""
        for active in self._active.values():
            with contextlib.suppress(ProcessLookupError):
                active.process.send_signal(signal.SIGTERM)
        for active in self._active.values():
            active.process.wait()
            with contextlib.suppress(OSError):
                active.log.close()
        self._active = {}

    def _run_grid(self) -> int:
        self.write_grid()
        pending = [run for run in self.plan.runs if not is_done(self.folder(run))]
        finished = {run.key for run in self.plan.runs if run not in pending}
        failed: set[str] = set()
        counts = ", ".join(f"{n} {stage}" for stage, n in self.plan.counts().items() if n)
        cpu_runs = sum(d is None for d in self.devices)
        slots = ", ".join(f"GPU {d}" for d in self.devices if d is not None) or (
            "the CPU, one run at a time" if cpu_runs == 1 else f"the CPU, {cpu_runs} runs at a time"
        )
        self.echo(
            f"[experiment] {self.plan.spec.name}: {len(self.plan.cells)} results from {len(self.plan.runs)} stage "
            f"runs ({counts}); {len(finished)} already finished, {len(pending)} to run on {slots}; in {self.out}"
        )
        self._active = {}
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (pending and self.stopping is None) or self._active:
                free = [slot for slot in range(len(self.devices)) if slot not in self._active]
                for slot in free:
                    if self.stopping is not None:
                        break
                    ready = next((r for r in pending if r.upstream is None or r.upstream.key in finished), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    self._active[slot] = self._start(ready, self.devices[slot])
                time.sleep(_POLL_S)
                for slot, active in list(self._active.items()):
                    # A child's CPU time joins RUSAGE_CHILDREN when it is reaped, here: the difference is its own.
                    before = _children_cpu_s()
                    rc = active.process.poll()
                    if rc is None:
                        continue
                    del self._active[slot]
                    if not self._finish_phase(active, rc, round(_children_cpu_s() - before, 2)):
                        if self.stopping is None:  # a phase stopped by our own signal is unfinished, not failed
                            failed.add(active.run.key)
                    elif self._next_phase(active.run) is None:
                        self._finish_run(active.run)
                        finished.add(active.run.key)
                    elif self.stopping is None:
                        self._active[slot] = self._start(active.run, active.device)
                blocked = [r for r in pending if r.upstream is not None and r.upstream.key in failed]
                for run in blocked:
                    pending.remove(run)
                    failed.add(run.key)
                    self.echo(f"[experiment] skipped {run.describe()}: the run it starts from failed")
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if self.stopping is not None:
            self.echo(f"[experiment] stopped by signal {self.stopping}: run the same command again to resume")
            return 128 + self.stopping
        if failed:
            self.echo(f"[experiment] {len(failed)} stage runs failed or were skipped; the others are kept")
            return 1
        self.echo(f"[experiment] all {len(self.plan.runs)} stage runs finished: umd experiment report {self.out}")
        return 0


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
