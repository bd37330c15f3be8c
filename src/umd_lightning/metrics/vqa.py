"""VQA accuracy over closed, open and all questions (UMD_SPEC 4.1, 5).

With the default ``vocab: train``, a test answer that is not in the training vocabulary cannot be predicted;
the dataset marks it with answer index ``-1``, it always counts as wrong, and the metric reports how many
there were.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class VQAAccuracy(Metric):
    """Exact-match accuracy of the arg-max answer, overall and split by question type.

    States are sums, reduced with ``sum`` across processes, so the result under DDP equals the single-process
    one (apart from samples a distributed sampler duplicates to even out the ranks).

    ``compute()`` returns a dict of 0-dim tensors: ``overall``, ``open``, ``closed`` (accuracies in [0, 1],
    NaN for a question type with no samples), ``n``, ``n_open``, ``n_closed``, ``n_outside_vocab`` (int64
    counts).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("correct_open", "correct_closed", "n_open", "n_closed", "n_outside_vocab"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_index: Tensor, answer_index: Tensor, is_closed: Tensor) -> None:
        """Add a batch.

        Args:
            pred_index: (B,) int64 predicted answer indices (arg-max of the logits).
            answer_index: (B,) int64 true answer indices, ``-1`` for an answer outside the vocabulary.
            is_closed: (B,) bool, True for closed (yes/no, choice) questions.
        """
        if not pred_index.shape == answer_index.shape == is_closed.shape or pred_index.dim() != 1:
            raise ValueError(
                "pred_index, answer_index and is_closed must all have shape (B,), got "
                f"{tuple(pred_index.shape)}, {tuple(answer_index.shape)}, {tuple(is_closed.shape)}"
            )
        is_closed = is_closed.bool()
        outside = answer_index < 0
        correct = (pred_index == answer_index) & ~outside
        self.correct_closed += (correct & is_closed).sum()
        self.correct_open += (correct & ~is_closed).sum()
        self.n_closed += is_closed.sum()
        self.n_open += (~is_closed).sum()
        self.n_outside_vocab += outside.sum()

    def compute(self) -> dict[str, Tensor]:
        """Accuracies and counts, see the class docstring."""
        n = self.n_open + self.n_closed
        return {
            "overall": _ratio(self.correct_open + self.correct_closed, n),
            "open": _ratio(self.correct_open, self.n_open),
            "closed": _ratio(self.correct_closed, self.n_closed),
            "n": n,
            "n_open": self.n_open.clone(),
            "n_closed": self.n_closed.clone(),
            "n_outside_vocab": self.n_outside_vocab.clone(),
        }


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` as float; NaN when the denominator is 0 (no such questions)."""
    if denominator.item() == 0:
        return torch.tensor(float("nan"), device=numerator.device)
    return numerator.double().div(denominator).float()


class QuestionTypeAccuracy(Metric):
    """Exact-match accuracy per question type (VQA-RAD's ``question_type``, SLAKE's ``content_type``, VQA-Med's
    category); a question of two types counts in both.

    The types are fixed when the metric is built (the test split's, from the DataModule), so the states have
    the same shape on every process and reduce with ``sum`` under DDP. A type not in ``types`` is ignored.

    ``compute()`` returns ``{"type/<T>/accuracy": 0-dim float (NaN with no question), "type/<T>/n": 0-dim
    int64}`` for each type ``T``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, types: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not types:
            raise ValueError("QuestionTypeAccuracy needs at least one question type")
        self.types = list(types)
        self._position = {name: i for i, name in enumerate(self.types)}
        for name in ("correct", "n"):
            self.add_state(name, default=torch.zeros(len(self.types), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_index: Tensor, answer_index: Tensor, question_types: list[tuple[str, ...]]) -> None:
        """Add a batch: (B,) predicted and true answer indices (``-1`` outside the vocabulary: wrong) and each
        question's types."""
        if len(question_types) != pred_index.shape[0]:
            raise ValueError(f"{len(question_types)} question types for a batch of {pred_index.shape[0]}")
        member = torch.zeros(len(question_types), len(self.types), dtype=torch.bool)
        for row, kinds in enumerate(question_types):
            for kind in kinds:
                if kind in self._position:
                    member[row, self._position[kind]] = True
        member = member.to(pred_index.device)
        correct = (pred_index == answer_index) & (answer_index >= 0)
        self.correct += (member & correct[:, None]).sum(0)
        self.n += member.sum(0)

    def compute(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for i, name in enumerate(self.types):
            values[f"type/{name}/accuracy"] = _ratio(self.correct[i], self.n[i])
            values[f"type/{name}/n"] = self.n[i].clone()
        return values
