"""The warm-up + linear / cosine learning-rate schedule, against hand-computed multipliers, and where
``transformers.get_scheduler`` (the library schedule) differs from it (so the shipped runs keep their numbers)."""

import math

import pytest
import torch
from transformers import get_scheduler

from umd_lightning.stages.base import lr_lambda

# The shipped fine-tuning configs: warmup_ratio 0.1, cosine. 20 steps -> 2 warm-up steps, 18 of decay.
COSINE_20 = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 18)) for k in range(18)]
LINEAR_20 = [0.5, 1.0] + [1 - k / 18 for k in range(18)]


@pytest.mark.parametrize(("schedule", "expected"), [("cosine", COSINE_20), ("linear", LINEAR_20)])
def test_warmup_then_decay_multipliers(schedule: str, expected: list[float]) -> None:
    factor = lr_lambda(20, 0.1, schedule)
    assert [factor(step) for step in range(20)] == pytest.approx(expected, abs=1e-12)
    assert factor(20) == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at the last step
    assert factor(11) == pytest.approx(0.5)  # half-way through the decay, for both shapes


def test_no_warmup_starts_at_the_full_rate() -> None:
    assert lr_lambda(10, 0.0, "linear")(0) == 1.0
    assert lr_lambda(3, 0.1, "cosine")(0) == 1.0  # round(0.3) = 0 warm-up steps (the CPU chain test's case)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_transformers_schedule_differs_only_in_the_warmup(schedule: str) -> None:
    """``get_scheduler`` warms up as ``step / warmup`` (0 at the first step), this schedule as ``(step + 1) /
    warmup``; after the warm-up they agree. Switching would change every shipped fine-tuning run's first steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    library = get_scheduler(schedule, optimizer, num_warmup_steps=2, num_training_steps=20)
    ours = lr_lambda(20, 0.1, schedule)
    theirs = [library.lr_lambdas[0](step) for step in range(21)]
    assert theirs[:2] == [0.0, 0.5] and [ours(0), ours(1)] == [0.5, 1.0]
    assert theirs[2:] == pytest.approx([ours(step) for step in range(2, 21)], abs=1e-12)
