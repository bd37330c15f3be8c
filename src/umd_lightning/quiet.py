"""Console noise that tells a user nothing, silenced where it arises and only for the duration of the call.

* transformers' "LOAD REPORT" table when the only keys it lists are the text model's pooler, which
  :class:`~umd_lightning.models.text.TextTower` leaves out on purpose (any other key is still reported), and the
  "Loading weights" progress bar of the same call;
* Lightning's "Tip: ... litlogger" advertisement printed while a ``Trainer`` is built;
* the model summary's FLOPs column, always 0 here (the stages define no ``example_input_array``):
  :class:`ModelSummaryWithoutFlops` replaces Lightning's default summary;
* the ``_pytree`` deprecation warning Lightning's own code triggers in torch at every step (nothing a user can
  change), filtered by its message while a ``umd`` command runs (:func:`known_warnings`).

Notebooks call :func:`silence_known_noise` once, for the two that a ``Trainer`` built by hand shows.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

TRANSFORMERS_LOADING_LOGGER = "transformers.modeling_utils"
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"
_REPORT_STATUSES = ("UNEXPECTED", "MISSING", "MISMATCH", "CONVERSION")
_PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _PoolerOnlyReport(logging.Filter):
    """Drops a transformers load report whose every listed key belongs to the pooler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        keys = [
            line.split("|")[0].strip()
            for line in message.splitlines()
            if "|" in line and any(status in line for status in _REPORT_STATUSES)
        ]
        return not (keys and all(key.startswith("pooler.") for key in keys))


class _NoLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def _filtered(logger_name: str, log_filter: logging.Filter) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


@contextlib.contextmanager
def quiet_text_loading() -> Iterator[None]:
    """Around ``AutoModel.from_pretrained`` of the text tower: no pooler-only load report, no progress bar."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _filtered(TRANSFORMERS_LOADING_LOGGER, _PoolerOnlyReport()):
            yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def quiet_trainer_init() -> contextlib.AbstractContextManager[None]:
    """Around ``Trainer(...)``: without the litlogger tip."""
    return _filtered(LIGHTNING_INFO_LOGGER, _NoLitLoggerTip())


@contextlib.contextmanager
def known_warnings() -> Iterator[None]:
    """While a command runs: without the ``_pytree`` ``LeafSpec`` deprecation Lightning's loops trigger."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PYTREE_WARNING)
        yield


def silence_known_noise() -> None:
    """For notebooks and scripts that build ``Trainer`` themselves: drop the litlogger tip and the ``_pytree``
    deprecation warning for the rest of the process (the ``umd`` commands do this per call)."""
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, _NoLitLoggerTip) for f in logger.filters):
        logger.addFilter(_NoLitLoggerTip())
    warnings.filterwarnings("ignore", message=_PYTREE_WARNING)


class ModelSummaryWithoutFlops(ModelSummary):
    """Lightning's model summary table without the FLOPs column and total (0 without an example input)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        lines = [line for line in table.splitlines() if "FLOPs" not in line and "Total Flops" not in line]
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + "\n".join(lines))


def replace_model_summary(callbacks: list[Any]) -> None:
    """Swap Lightning's default (rich or plain) model summary in ``callbacks`` for the one without FLOPs."""
    for index, callback in enumerate(callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            callbacks[index] = ModelSummaryWithoutFlops(max_depth=callback._max_depth)
