"""``umd experiment report DIR``: the tables, paired comparisons and plots of an experiment, from saved results.

It reads only what the runner and ``umd test`` saved: ``DIR/grid.json`` (the rows, data sets, seeds and which
stage run produces each cell) and each finished run's ``test_results.json`` and ``compute.json``. Cells whose run
has not finished are counted as missing, so a report can be built while a grid is still running. It writes, into
``DIR/report/`` (or ``--out``):

* ``report.md``: per data set, the test metrics of each row as mean +- sample std over seeds with ``n``, the leak
  label of the evaluation policy, the paired comparison of each row with its ``baseline`` (same seeds: mean
  difference and 95% t-interval) and the compute of every stage run;
* ``results.csv`` (one line per data set, row and metric, with every seed's value), ``paired.csv``,
  ``compute.csv``;
* ``<dataset>.png``: the data set's headline metric per row, bars at the mean with +- 1 std error bars and
  every seed's value as a dot.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umd_lightning.errors import ConfigError
from umd_lightning.experiment.runner import COMPUTE, DONE, GRID, TEST_RESULTS
from umd_lightning.experiment.stats import Paired, Summary, paired_difference, summarize


def _is_count(metric: str) -> bool:
    last = metric.rsplit("/", 1)[-1]
    return last == "n" or last.startswith("n_")


@dataclass
class DatasetResults:
    name: str
    metric: str
    values: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    """row -> metric -> seed -> value."""
    counts: dict[str, float] = field(default_factory=dict)
    leaks: dict[str, list[str]] = field(default_factory=dict)
    """row -> the leak notes of its test results (empty: no leak)."""
    missing: dict[str, list[int]] = field(default_factory=dict)
    """row -> seeds whose run has not finished."""
    seconds: dict[str, list[float]] = field(default_factory=dict)
    """row -> wall time of each of its finished fine-tuning runs (fit and test)."""

    def metrics(self) -> list[str]:
        found = sorted({m for per_row in self.values.values() for m in per_row if not _is_count(m)})
        ordered = [self.metric] if self.metric in found else []
        ordered += [m for m in found if m != self.metric and not m.endswith("/loss")]
        return ordered + [m for m in found if m.endswith("/loss")]


@dataclass
class Report:
    name: str
    rows: dict[str, dict[str, Any]]
    datasets: dict[str, DatasetResults]
    compute: list[dict[str, Any]]

    def summary(self, dataset: str, row: str, metric: str) -> Summary | None:
        values = self.datasets[dataset].values.get(row, {}).get(metric, {})
        return summarize(list(values.values())) if values else None

    def paired(self, dataset: str, row: str) -> tuple[Paired, list[int]] | None:
        """``row`` against its baseline on the data set's metric, over the seeds both have."""
        baseline = self.rows[row].get("baseline")
        results = self.datasets[dataset]
        if baseline is None:
            return None
        with_ = results.values.get(row, {}).get(results.metric, {})
        without = results.values.get(baseline, {}).get(results.metric, {})
        seeds = sorted(set(with_) & set(without))
        if not seeds:
            return None
        return paired_difference([with_[s] for s in seeds], [without[s] for s in seeds]), seeds


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({exc}): is this an experiment folder?") from None


def load_report(folder: Path) -> Report:
    """Collect every finished cell's test results and every finished run's compute."""
    grid_path = folder / GRID
    if not grid_path.is_file():
        raise ConfigError(f"{folder} holds no {GRID}: give the folder `umd experiment run` wrote (its --out)")
    grid = _read_json(grid_path)
    runs = grid["runs"]
    datasets = {name: DatasetResults(name, info["metric"]) for name, info in grid["datasets"].items()}
    for cell in grid["cells"]:
        results = datasets[cell["dataset"]]
        run_folder = folder / runs[cell["run"]]["folder"]
        if not (run_folder / DONE).is_file():
            results.missing.setdefault(cell["row"], []).append(cell["seed"])
            continue
        saved = _read_json(run_folder / TEST_RESULTS)
        per_row = results.values.setdefault(cell["row"], {})
        for metric, value in saved["metrics"].items():
            if not metric.startswith("test/"):
                continue
            if _is_count(metric):
                results.counts[metric] = value
            else:
                per_row.setdefault(metric, {})[cell["seed"]] = float(value)
        results.seconds.setdefault(cell["row"], []).append(_read_json(run_folder / COMPUTE)["wall_s"])
        notes = results.leaks.setdefault(cell["row"], [])
        notes += [note for note in saved.get("leak_notes") or [] if note not in notes]
    compute = []
    for key, run in runs.items():
        run_folder = folder / run["folder"]
        if (run_folder / DONE).is_file():
            compute.append({"key": key, **run, **_read_json(run_folder / COMPUTE)})
    return Report(grid["name"], grid["rows"], datasets, compute)


# ---------------------------------------------------------------------------------------------- formatting
def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return "–"
    return f"{summary.mean:.4f} ± {_number(summary.std)} (n={summary.n})"


def _seconds(values: list[float] | None) -> str:
    return "–" if not values else f"{sum(values) / len(values):.0f}"


def _leak_label(notes: list[str]) -> str:
    return "LEAKY: " + "; ".join(notes) if notes else "no leak (no leaky evaluation option is set)"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def markdown(report: Report) -> str:
    out = [f"# Experiment {report.name}", ""]
    out.append(
        "Cells: mean ± sample standard deviation over seeds (n = seeds with a finished run); finetune s: mean wall "
        "time of the row's fine-tuning runs (fit + test; the upstream runs are in the compute table). Paired: the "
        "per-seed difference row − baseline on the same seeds, its mean and 95% t-interval."
    )
    for dataset, results in report.datasets.items():
        out += ["", f"## {dataset}", ""]
        rows = [row for row in report.rows if row in results.values or row in results.missing]
        metrics = results.metrics()
        lines = [
            [row, *(_cell(report.summary(dataset, row, m)) for m in metrics), _seconds(results.seconds.get(row))]
            for row in rows
        ]
        out += _table(["row", *metrics, "finetune s"], lines)
        if results.counts:
            out += ["", "Test set: " + ", ".join(f"{k} = {v:g}" for k, v in sorted(results.counts.items()))]
        labels = {row: _leak_label(notes) for row, notes in results.leaks.items()}
        if len(set(labels.values())) <= 1:
            out += ["", f"Evaluation: {next(iter(labels.values()), 'no finished run')}"]
        else:
            out += ["", "Evaluation:"] + [f"- {row}: {label}" for row, label in labels.items()]
        for row, seeds in results.missing.items():
            out += [f"- {row}: no finished run yet for seed(s) {', '.join(map(str, seeds))}"]
        paired = [(row, found) for row in rows if (found := report.paired(dataset, row)) is not None]
        if paired:
            out += ["", f"Paired comparison on {results.metric}:", ""]
            lines = []
            for row, (diff, _seeds) in paired:
                ci = f"[{_number(diff.low)}, {_number(diff.high)}]" if diff.low is not None else "– (one pair)"
                baseline = report.rows[row]["baseline"]
                lines.append([f"{row} − {baseline}", str(diff.n), f"{diff.mean:+.4f}", _number(diff.std), ci])
            out += _table(["comparison", "pairs", "mean diff", "std", "95% CI"], lines)
    out += [
        "",
        "## Compute",
        "",
        "Wall time of each stage run (every attempt, start-up included), the CPU seconds of its processes (– when "
        "an attempt was killed with its runner) and its optimiser steps.",
        "",
    ]
    lines = [
        [
            c["stage"],
            c["dataset"],
            ", ".join(c["rows"]),
            str(c["seed"]),
            f"{c['wall_s']:.0f}",
            "–" if c.get("cpu_s") is None else f"{c['cpu_s']:.0f}",
            str(c.get("steps", "–")),
            c["folder"],
        ]
        for c in report.compute
    ]
    out += _table(["stage", "data", "rows", "seed", "wall s", "CPU s", "steps", "folder"], lines)
    total = sum(c["wall_s"] for c in report.compute)
    cpu = sum(c.get("cpu_s") or 0.0 for c in report.compute)
    out += [
        "",
        f"Total: {len(report.compute)} finished stage runs, {total:.0f} s wall ({total / 3600:.2f} h), "
        f"{cpu:.0f} CPU s (known part).",
    ]
    return "\n".join(out) + "\n"


def write_csvs(report: Report, out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["dataset", "row", "metric", "n", "mean", "std", "seeds", "values"])
        for dataset, results in report.datasets.items():
            for row, per_metric in results.values.items():
                for metric in results.metrics():
                    values = per_metric.get(metric)
                    if not values:
                        continue
                    summary = summarize(list(values.values()))
                    seeds = sorted(values)
                    writer.writerow(
                        [
                            dataset,
                            row,
                            metric,
                            summary.n,
                            repr(summary.mean),
                            "" if summary.std is None else repr(summary.std),
                            ";".join(map(str, seeds)),
                            ";".join(repr(values[s]) for s in seeds),
                        ]
                    )
    with open(out / "paired.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["dataset", "row", "baseline", "metric", "pairs", "mean_diff", "std", "ci95_low", "ci95_high"])
        for dataset, results in report.datasets.items():
            for row in report.rows:
                found = report.paired(dataset, row)
                if found is None:
                    continue
                diff, _ = found
                writer.writerow(
                    [dataset, row, report.rows[row]["baseline"], results.metric, diff.n, repr(diff.mean)]
                    + ["" if v is None else repr(v) for v in (diff.std, diff.low, diff.high)]
                )
    with open(out / "compute.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["stage", "dataset", "rows", "seed", "wall_s", "fit_s", "test_s", "cpu_s", "steps", "folder"])
        for c in report.compute:
            writer.writerow(
                [
                    *(c["stage"], c["dataset"], ";".join(c["rows"]), c["seed"], c["wall_s"]),
                    *(c.get("fit_s", ""), c.get("test_s", ""), c.get("cpu_s", ""), c.get("steps", ""), c["folder"]),
                ]
            )


def plot(report: Report, dataset: str, path: Path) -> None:
    """A bar per row at the mean of the data set's metric, +- 1 std error bars, each seed's value as a dot."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "the report's plot needs matplotlib: pip install 'umd_lightning[experiment]' (tables and CSVs are written)"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    results = report.datasets[dataset]
    rows = [row for row in report.rows if results.values.get(row, {}).get(results.metric)]
    figure, axes = plt.subplots(figsize=(1.3 * max(len(rows), 3) + 1.5, 4.0))
    for x, row in enumerate(rows):
        values = results.values[row][results.metric]
        summary = summarize(list(values.values()))
        axes.bar(x, summary.mean, yerr=summary.std or 0.0, capsize=5, color="#8fb3d9", edgecolor="#2f5d8a")
        axes.scatter([x] * len(values), list(values.values()), color="#1b1b1b", s=12, zorder=3)
    labels = [f"{row}\n(n={len(results.values[row][results.metric])})" for row in rows]
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylabel(results.metric)
    leaky = any(results.leaks.values())
    axes.set_title(f"{report.name}: {dataset} ({'LEAKY evaluation' if leaky else 'no leak'})", fontsize=10)
    axes.text(
        0.99, 0.99, "bars: mean ± 1 std over seeds; dots: seeds", transform=axes.transAxes, ha="right", va="top",
        fontsize=7,
    )  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_report(folder: Path, out: Path | None = None) -> tuple[Report, Path]:
    """Write the report files of the experiment in ``folder`` into ``out`` (default ``folder/report``)."""
    report = load_report(folder)
    out = out or folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(report))
    write_csvs(report, out)
    for dataset, results in report.datasets.items():
        if any(results.values.get(row, {}).get(results.metric) for row in report.rows):
            plot(report, dataset, out / f"{dataset}.png")
    return report, out
