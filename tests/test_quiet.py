"""The console noise filters drop only what they name: a pooler-only load report (not one with other keys), the
litlogger tip, the FLOPs column, and nothing once their scope ends."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel

from umd_lightning.models import TextConfig, TextTower
from umd_lightning.quiet import (
    LIGHTNING_INFO_LOGGER,
    TRANSFORMERS_LOADING_LOGGER,
    ModelSummaryWithoutFlops,
    quiet_text_loading,
    quiet_trainer_init,
    replace_model_summary,
)

POOLER_REPORT = """BertModel LOAD REPORT from: x
Key                 | Status     |  |
--------------------+------------+--+-
pooler.dense.bias   | UNEXPECTED |  |
pooler.dense.weight | UNEXPECTED |  |
"""


def test_only_a_pooler_only_report_is_dropped(caplog):
    logger = logging.getLogger(TRANSFORMERS_LOADING_LOGGER)
    other = POOLER_REPORT + "encoder.layer.0.attention.self.query.weight | MISSING |  |\n"
    with caplog.at_level(logging.WARNING, logger=TRANSFORMERS_LOADING_LOGGER):
        with quiet_text_loading():
            logger.warning(POOLER_REPORT)
            logger.warning(other)
            logger.warning("something else")
        logger.warning(POOLER_REPORT)  # outside the scope: reported again
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [other, "something else", POOLER_REPORT]


def test_minilm_loads_without_its_report(capfd, caplog):
    with caplog.at_level(logging.WARNING):
        TextTower(TextConfig())
    assert "LOAD REPORT" not in capfd.readouterr().err + caplog.text


def test_trainer_without_the_litlogger_tip_and_summary_without_flops(caplog, capsys):
    with caplog.at_level(logging.INFO, logger=LIGHTNING_INFO_LOGGER), quiet_trainer_init():
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert "litlogger" not in caplog.text
    replace_model_summary(trainer.callbacks)
    assert any(isinstance(callback, ModelSummaryWithoutFlops) for callback in trainer.callbacks)
    with caplog.at_level(logging.INFO):
        trainer.fit(BoringModel())
    printed = caplog.text + capsys.readouterr().out
    assert "Trainable params" in printed and "FLOPs" not in printed and "Flops" not in printed
