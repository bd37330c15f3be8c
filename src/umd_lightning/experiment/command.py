"""``umd experiment run SPEC.yaml [--out DIR] [--devices auto|cpu|cpu:N|0,1] [--dry-run]`` and
``umd experiment report DIR [--out REPORT_DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from umd_lightning.errors import ConfigError
from umd_lightning.experiment.runner import Runner, detect_devices, phases
from umd_lightning.experiment.spec import Plan, load_spec, make_plan


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umd experiment", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) every stage run of a spec's grid")
    run.add_argument("spec", type=Path, help="the experiment YAML (configs/experiments/*.yaml)")
    run.add_argument("--out", type=Path, default=None, help="experiment folder (default runs/experiments/<name>)")
    run.add_argument(
        "--devices",
        default="auto",
        help="auto (every visible GPU, else the CPU), cpu (one run at a time), cpu:N (N at once), or GPU ids "
        "such as 0,1: one run per device",
    )
    run.add_argument("--dry-run", action="store_true", help="print the stage runs and their commands, run nothing")
    report = commands.add_parser("report", help="tables, paired comparisons and plots from an experiment folder")
    report.add_argument("folder", type=Path, help="the folder `umd experiment run` wrote")
    report.add_argument("--out", type=Path, default=None, help="where the report goes (default FOLDER/report)")
    return parser


def describe_plan(plan: Plan, runner: Runner) -> str:
    counts = ", ".join(f"{n} {stage}" for stage, n in plan.counts().items() if n)
    lines = [f"{plan.spec.name}: {len(plan.cells)} results from {len(plan.runs)} stage runs ({counts})"]
    for number, run in enumerate(plan.runs, start=1):
        lines.append(f"[{number}/{len(plan.runs)}] {run.describe()} -> {runner.folder(run)}")
        lines += [f"    {' '.join(runner.command(run, phase))}" for phase in phases(run)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``umd experiment``; returns the exit status (2: a mistake in the spec or the folder)."""
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.command == "report":
            from umd_lightning.experiment.report import build_report, markdown

            report, out = build_report(args.folder, args.out)
            print(markdown(report))
            print(f"[experiment] report written to {out}")
            return 0
        plan = make_plan(load_spec(args.spec))
        out = args.out or Path("runs") / "experiments" / plan.spec.name
        if args.dry_run:
            print(describe_plan(plan, Runner(plan, out, [None])))
            return 0
        return Runner(plan, out, detect_devices(args.devices), echo=lambda line: print(line, flush=True)).run()
    except ConfigError as exc:
        print(f"umd experiment: error: {exc}", file=sys.stderr)
        return 2
