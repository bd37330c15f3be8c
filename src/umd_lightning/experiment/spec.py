"""Experiment specs: the YAML that names a grid of stage runs, and the plan of stage runs it resolves to.

A spec names the base config of each stage, the downstream data sets, the rows (which stages a row runs, each
with its own override list) and the seeds::

    seeds: [0, 1, 2]
    shared_stages: [pretrain]        # run once, with the first seed, and reused by every seed (the default)
    pretrain:
      config: configs/pretrain/medpix.yaml
      overrides: [--model.init_args.preset=small]
    calib:
      overrides: [--model.init_args.preset=small]      # every calib run, on top of the data set's config
    finetune:
      overrides: [--model.init_args.preset=small]
    datasets:
      vqa_rad:
        metric: test/overall         # optional: the finetune config's checkpoint.monitor with val/ -> test/
        calib: {config: configs/calib/vqa_rad.yaml}
        finetune: {config: configs/finetune/vqa_rad.yaml, overrides: [--data.init_args.batch_size=16]}
    rows:
      no_pretrain: {finetune: ['--trainer.callbacks=[]']}
      mr_pretrain: {pretrain: [], finetune: ['--trainer.callbacks=[]'], baseline: no_pretrain}

A row runs the stages it names, in the order pretrain -> calib -> finetune (finetune is required); each stage
starts from the row's previous stage (``--model.init_args.pretrained=<its run folder>``), or from nothing
(``pretrained=null``) when the row runs no earlier stage. ``baseline`` names the row a paired comparison sets this
row against (same data set, same seed). Overrides are ``umd`` arguments of the form ``--key=value``
(``--config=extra.yaml`` adds a config file). Relative config paths are read from the current folder, as ``umd``
reads them.

Each stage run is keyed by a hash of its resolved inputs: the stage, the contents of its config files, its
override list, its seed and the key of the run it starts from. Equal keys are one run, so a pre-training shared by
several rows, data sets and seeds runs once, and a finished run is found again by its key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from umd_lightning.errors import ConfigError

STAGES = ("pretrain", "calib", "finetune")
SPEC_KEYS = ("name", "seeds", "shared_stages", "test_checkpoint", *STAGES, "datasets", "rows")
STAGE_KEYS = ("config", "overrides")
DATASET_KEYS = ("metric", "calib", "finetune")
ROW_KEYS = (*STAGES, "baseline")
KEY_LENGTH = 12
"""Hex digits of a run's key used in its folder name."""


@dataclass(frozen=True)
class StageBase:
    """A stage's base config file and the overrides every run of it takes (``config`` may be ``None`` at the top
    level of calib / finetune, whose configs are per data set)."""

    config: Path | None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    name: str
    metric: str
    calib: StageBase | None
    finetune: StageBase


@dataclass(frozen=True)
class Row:
    name: str
    stages: dict[str, tuple[str, ...]]
    """The stages this row runs, in order, each with the row's overrides."""
    baseline: str | None = None


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    seeds: tuple[int, ...]
    shared_stages: frozenset[str]
    test_checkpoint: str
    stages: dict[str, StageBase]
    datasets: dict[str, Dataset]
    rows: dict[str, Row]


@dataclass
class StageRun:
    """One run of one stage: what it is made of (hashed into ``key``) and the grid cells that need it."""

    key: str
    stage: str
    dataset: str
    seed: int
    config: Path
    overrides: tuple[str, ...]
    upstream: StageRun | None
    rows: list[str] = field(default_factory=list)
    seeds_served: list[int] = field(default_factory=list)
    datasets_served: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """The run's folder, relative to the experiment folder."""
        return Path("runs") / self.stage / self.dataset / self.key[:KEY_LENGTH]

    def describe(self) -> str:
        """``finetune vqa_rad +gm_coord seed 1`` / ``pretrain medpix (rows a, b; seeds 0, 1)``."""
        rows = ", ".join(self.rows)
        if self.stage == "finetune":
            return f"{self.stage} {self.dataset} {rows} seed {self.seed}"
        served = ", ".join(str(s) for s in self.seeds_served)
        return f"{self.stage} {self.dataset} seed {self.seed} (rows {rows}; for seeds {served})"


@dataclass(frozen=True)
class Cell:
    """One result of the grid: a row on a data set with a seed, and the finetune run that produces it."""

    dataset: str
    row: str
    seed: int
    run: StageRun
    chain: tuple[StageRun, ...]


@dataclass
class Plan:
    spec: Spec
    runs: list[StageRun]
    """Every distinct stage run, upstream runs before the runs that start from them."""
    cells: list[Cell]

    def counts(self) -> dict[str, int]:
        """Distinct stage runs per stage (after reuse)."""
        return {stage: sum(run.stage == stage for run in self.runs) for stage in STAGES}


# ---------------------------------------------------------------------------------------------- reading the YAML
def _check_keys(value: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (expected one of {', '.join(allowed)})")
    return value


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of --key=value arguments, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not (isinstance(item, str) and item.startswith("--") and "=" in item):
            raise ConfigError(f"{where}[{index}]: {item!r} is not a umd argument of the form --key=value")
    return tuple(value)


def _existing_file(value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a config file path, got {value!r}")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found: {path} (relative paths are read from {Path.cwd()})")
    return path


def _extra_configs(overrides: tuple[str, ...], where: str) -> list[Path]:
    """Config files added by ``--config=...`` overrides (checked to exist: their contents are hashed)."""
    return [
        _existing_file(item.partition("=")[2], f"{where}: {item}")
        for item in overrides
        if item.partition("=")[0] == "--config"
    ]


def _stage_base(value: Any, where: str, needs_config: bool) -> StageBase:
    value = _check_keys(value, where, STAGE_KEYS)
    config = value.get("config")
    if config is None and needs_config:
        raise ConfigError(f"{where}: missing key 'config' (the stage's base config file)")
    overrides = _overrides(value.get("overrides"), f"{where}.overrides")
    _extra_configs(overrides, f"{where}.overrides")
    return StageBase(_existing_file(config, f"{where}.config") if config is not None else None, overrides)


def _default_metric(config: Path, where: str) -> str:
    monitor = ((yaml.safe_load(config.read_text()) or {}).get("checkpoint") or {}).get("monitor")
    if not isinstance(monitor, str) or not monitor.startswith("val/"):
        raise ConfigError(f"{where}: no metric given and {config} monitors no val/ metric: set {where}.metric")
    return "test/" + monitor.removeprefix("val/")


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec; every mistake is one :class:`ConfigError` line naming the key or file at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    raw = _check_keys(raw, str(path), SPEC_KEYS)
    where = path.name

    seeds = raw.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds: {seeds} lists a seed twice")
    shared = raw.get("shared_stages", ["pretrain"])
    if not isinstance(shared, list) or any(stage not in ("pretrain", "calib") for stage in shared):
        raise ConfigError(f"{where}: shared_stages: expected a list of pretrain / calib, got {shared!r}")
    test_checkpoint = raw.get("test_checkpoint", "best")
    if test_checkpoint not in ("best", "last"):
        raise ConfigError(f"{where}: test_checkpoint: expected best or last, got {test_checkpoint!r}")

    stages = {
        stage: _stage_base(raw.get(stage) or {}, f"{where}: {stage}", needs_config=stage == "pretrain")
        for stage in STAGES
        if stage in raw or stage != "pretrain"
    }

    datasets_raw = _check_keys(raw.get("datasets"), f"{where}: datasets", tuple(raw.get("datasets") or ()))
    if not datasets_raw:
        raise ConfigError(f"{where}: datasets: name at least one downstream data set")
    datasets = {}
    for name, value in datasets_raw.items():
        at = f"{where}: datasets.{name}"
        value = _check_keys(value, at, DATASET_KEYS)
        if "finetune" not in value:
            raise ConfigError(f"{at}: missing key 'finetune' (the data set's fine-tuning config)")
        finetune = _stage_base(value["finetune"], f"{at}.finetune", needs_config=True)
        calib = _stage_base(value["calib"], f"{at}.calib", needs_config=True) if "calib" in value else None
        metric = value.get("metric") or _default_metric(finetune.config, f"{at}")
        if not isinstance(metric, str):
            raise ConfigError(f"{at}.metric: expected a metric name such as test/acc, got {metric!r}")
        datasets[str(name)] = Dataset(str(name), metric, calib, finetune)

    rows_raw = raw.get("rows")
    if not isinstance(rows_raw, dict) or not rows_raw:
        raise ConfigError(f"{where}: rows: name at least one row (a mapping of row name -> its stages)")
    rows = {}
    for name, value in rows_raw.items():
        at = f"{where}: rows.{name}"
        value = _check_keys(value if value is not None else {}, at, ROW_KEYS)
        if "finetune" not in value:
            raise ConfigError(f"{at}: missing key 'finetune' (every row ends in a fine-tuning run)")
        row_stages = {}
        for stage in STAGES:
            if stage in value:
                row_stages[stage] = _overrides(value[stage], f"{at}.{stage}")
                _extra_configs(row_stages[stage], f"{at}.{stage}")
        if "pretrain" in row_stages and "pretrain" not in stages:
            raise ConfigError(f"{at}: runs pretrain but the spec names no pretrain config (add pretrain.config)")
        for dataset in datasets.values():
            if "calib" in row_stages and dataset.calib is None:
                raise ConfigError(f"{at}: runs calib but datasets.{dataset.name} names no calib config")
        baseline = value.get("baseline")
        if baseline is not None and baseline not in rows_raw:
            raise ConfigError(f"{at}.baseline: {baseline!r} is not a row of this spec")
        if baseline == name:
            raise ConfigError(f"{at}.baseline: a row cannot be its own baseline")
        rows[str(name)] = Row(str(name), row_stages, baseline)

    return Spec(
        path=path,
        name=str(raw.get("name") or path.stem),
        seeds=tuple(seeds),
        shared_stages=frozenset(shared),
        test_checkpoint=test_checkpoint,
        stages=stages,
        datasets=datasets,
        rows=rows,
    )


# ---------------------------------------------------------------------------------------------- planning
def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_key(stage: str, config: Path, overrides: tuple[str, ...], seed: int, upstream: StageRun | None) -> str:
    """The hash of a stage run's resolved inputs: its stage, the contents of its config files (the base config and
    any ``--config=`` override, not their paths), its overrides, its seed and the run it starts from."""
    inputs = {
        "stage": stage,
        "config": file_digest(config),
        "extra_configs": [file_digest(p) for p in _extra_configs(overrides, "overrides")],
        "overrides": list(overrides),
        "seed": seed,
        "upstream": upstream.key if upstream is not None else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _stage_inputs(spec: Spec, dataset: Dataset, row: Row, stage: str) -> tuple[Path, tuple[str, ...]]:
    """The base config and the full override list (stage-wide, then the data set's, then the row's)."""
    common = spec.stages[stage]
    if stage == "pretrain":
        assert common.config is not None
        return common.config, common.overrides + row.stages[stage]
    own = dataset.calib if stage == "calib" else dataset.finetune
    assert own is not None and own.config is not None
    return own.config, common.overrides + own.overrides + row.stages[stage]


def _pretrain_name(config: Path) -> str:
    return config.stem


def make_plan(spec: Spec) -> Plan:
    """Every distinct stage run of the grid (rows x data sets x seeds), each once, upstream first."""
    runs: dict[str, StageRun] = {}
    cells = []
    for dataset in spec.datasets.values():
        for row in spec.rows.values():
            for seed in spec.seeds:
                upstream: StageRun | None = None
                chain = []
                for stage in STAGES:
                    if stage not in row.stages:
                        continue
                    config, overrides = _stage_inputs(spec, dataset, row, stage)
                    stage_seed = spec.seeds[0] if stage in spec.shared_stages else seed
                    key = run_key(stage, config, overrides, stage_seed, upstream)
                    name = _pretrain_name(config) if stage == "pretrain" else dataset.name
                    run = runs.setdefault(key, StageRun(key, stage, name, stage_seed, config, overrides, upstream))
                    for served, value in ((run.rows, row.name), (run.seeds_served, seed)):
                        if value not in served:
                            served.append(value)
                    if dataset.name not in run.datasets_served:
                        run.datasets_served.append(dataset.name)
                    chain.append(run)
                    upstream = run
                assert upstream is not None
                cells.append(Cell(dataset.name, row.name, seed, upstream, tuple(chain)))
    order = {stage: index for index, stage in enumerate(STAGES)}
    ordered = sorted(runs.values(), key=lambda r: order[r.stage])  # stable: grid order within a stage
    return Plan(spec, ordered, cells)
