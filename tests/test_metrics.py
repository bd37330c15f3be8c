"""Task metrics (UMD_SPEC 4.1, 5) on hand-made predictions and score matrices with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from umd_lightning.metrics import QuestionTypeAccuracy, VQAAccuracy, classification_metrics, recall_at_k
from umd_lightning.metrics import retrieval as retrieval_module

# ------------------------------------------------------------------------------------------------------------
# VQA


def test_vqa_accuracy_with_out_of_vocabulary_answers() -> None:
    metric = VQAAccuracy()
    # closed: right, wrong, right; open: right, out-of-vocabulary (-1, predicted 0: still wrong), wrong
    metric.update(
        pred_index=torch.tensor([1, 0, 2, 5, 0, 3]),
        answer_index=torch.tensor([1, 1, 2, 5, -1, 4]),
        is_closed=torch.tensor([True, True, True, False, False, False]),
    )
    # A prediction of -1 never matches an out-of-vocabulary answer either.
    metric.update(torch.tensor([-1]), torch.tensor([-1]), torch.tensor([True]))
    result = metric.compute()
    assert result["closed"].item() == pytest.approx(2 / 4)
    assert result["open"].item() == pytest.approx(1 / 3)
    assert result["overall"].item() == pytest.approx(3 / 7)
    assert (result["n"].item(), result["n_open"].item(), result["n_closed"].item()) == (7, 3, 4)
    assert result["n_outside_vocab"].item() == 2


def test_vqa_accuracy_states_add_up_like_ranks() -> None:
    # Two "ranks" merged must equal one metric that saw everything (the states are sums, reduced with sum).
    pred, answer = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, -1])
    closed = torch.tensor([True, False, False, True])
    whole, rank0, rank1 = VQAAccuracy(), VQAAccuracy(), VQAAccuracy()
    whole.update(pred, answer, closed)
    rank0.update(pred[:2], answer[:2], closed[:2])
    rank1.update(pred[2:], answer[2:], closed[2:])
    rank0.merge_state(rank1)
    assert {k: v.item() for k, v in rank0.compute().items()} == {k: v.item() for k, v in whole.compute().items()}


def test_vqa_accuracy_empty_question_type_is_nan() -> None:
    metric = VQAAccuracy()
    metric.update(torch.tensor([3, 4]), torch.tensor([3, 0]), torch.tensor([True, True]))
    result = metric.compute()
    assert result["closed"].item() == pytest.approx(0.5) and result["overall"].item() == pytest.approx(0.5)
    assert math.isnan(result["open"].item()) and result["n_open"].item() == 0


def test_vqa_accuracy_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        VQAAccuracy().update(torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([True, False]))


def test_question_type_accuracy_hand_computed_and_merged_like_ranks() -> None:
    types = ["ABN", "POS", "PRES"]
    pred, answer = torch.tensor([1, 0, 2, 4, 7]), torch.tensor([1, 1, 2, -1, 7])
    kinds = [("PRES",), ("PRES", "POS"), ("POS",), ("ABN",), ("COLOR",)]  # COLOR is not a type of the metric
    whole, rank0, rank1 = (QuestionTypeAccuracy(types) for _ in range(3))
    whole.update(pred, answer, kinds)
    rank0.update(pred[:2], answer[:2], kinds[:2])
    rank1.update(pred[2:], answer[2:], kinds[2:])
    rank0.merge_state(rank1)
    # PRES: right, wrong -> 1/2; POS (counted for the two-type question too): wrong, right -> 1/2;
    # ABN: its answer is outside the vocabulary -> 0/1.
    expected = {"ABN": (0.0, 1), "POS": (0.5, 2), "PRES": (0.5, 2)}
    for metric in (whole, rank0):
        result = metric.compute()
        assert {k: (result[f"type/{k}/accuracy"].item(), result[f"type/{k}/n"].item()) for k in types} == expected
    with pytest.raises(ValueError, match="2 question types for a batch of 5"):
        whole.update(pred, answer, kinds[:2])


# ------------------------------------------------------------------------------------------------------------
# Retrieval

# Images 0 and 2 share the caption "a"; the text list holds "a" twice (indices 0 and 3).
IMAGE_CAPTIONS = ["a", "b", "a", "c"]
TEXTS = ["a", "b", "c", "a"]
SCORES = torch.tensor(
    [
        [0.1, 0.9, 0.2, 0.5],  # image "a": best relevant text 3 (0.5), beaten by text 1 -> rank 1
        [0.3, 0.8, 0.1, 0.0],  # image "b": text 1 on top -> rank 0
        [0.7, 0.2, 0.6, 0.4],  # image "a": text 0 on top (index 0, not the diagonal index 2) -> rank 0
        [0.5, 0.5, 0.5, 0.5],  # image "c": all tied, ties count against -> rank 3
    ]
)
# Text ranks (columns): "a" -> image 2 at 0.7 on top: 0; "b" -> image 0 (0.9) beats image 1 (0.8): 1;
# "c" -> image 2 (0.6) beats image 3 (0.5): 1; "a" (text 3) -> image 0 at 0.5 tied with image 3: 1.


def test_recall_at_k_string_equality_and_ties() -> None:
    result = recall_at_k(SCORES, IMAGE_CAPTIONS, TEXTS, ks=(1, 2, 4))
    expected = {
        "i2t_r1": 2 / 4,
        "i2t_r2": 3 / 4,
        "i2t_r4": 1.0,
        "t2i_r1": 1 / 4,
        "t2i_r2": 1.0,
        "t2i_r4": 1.0,
    }
    assert result == pytest.approx({**expected, "rsum": sum(expected.values())})


def test_recall_at_k_default_keys_and_order_independence() -> None:
    result = recall_at_k(SCORES, IMAGE_CAPTIONS, TEXTS)
    assert set(result) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
    # Permuting the texts (and the score columns with them) changes nothing, ties included.
    perm = [3, 1, 0, 2]
    permuted = recall_at_k(SCORES[:, perm], IMAGE_CAPTIONS, [TEXTS[i] for i in perm])
    assert permuted == pytest.approx(result)


def test_recall_at_k_matches_topk_without_ties_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval_module, "_CHUNK", 3)  # several chunks for 10 queries
    n = 10
    scores = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    captions = [f"caption {i}" for i in range(n)]
    result = recall_at_k(scores, captions, captions, ks=(1, 3))
    diagonal = torch.arange(n)
    for k in (1, 3):
        i2t = (scores.topk(k, dim=1).indices == diagonal[:, None]).any(1).float().mean().item()
        t2i = (scores.T.topk(k, dim=1).indices == diagonal[:, None]).any(1).float().mean().item()
        assert result[f"i2t_r{k}"] == pytest.approx(i2t) and result[f"t2i_r{k}"] == pytest.approx(t2i)


def test_recall_at_k_errors() -> None:
    with pytest.raises(ValueError, match="scores must be"):
        recall_at_k(torch.zeros(2, 3), ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="every image caption"):
        recall_at_k(torch.zeros(2, 2), ["a", "z"], ["a", "b"])


# ------------------------------------------------------------------------------------------------------------
# Classification

PROBS = torch.tensor(
    [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [0.5, 0.1, 0.4]]
)
TARGET = torch.tensor([0, 0, 1, 1, 2, 2])
# Accuracy 4/6. F1: class 0 P = R = 1/2 -> 1/2; class 1 P = 2/3, R = 1 -> 4/5; class 2 P = 1, R = 1/2 -> 2/3.
# One-vs-rest AUROC: class 0 7/8, class 1 7/8, class 2 8/8 (pairs of positive over negative probabilities).
EXPECTED = {"acc": 4 / 6, "f1_macro": (1 / 2 + 4 / 5 + 2 / 3) / 3, "auroc_macro": (7 / 8 + 7 / 8 + 1) / 3}


@pytest.mark.parametrize("as_logits", [False, True])
def test_classification_metrics_hand_computed(as_logits: bool) -> None:
    metrics = classification_metrics(num_classes=3, prefix="test/")
    preds = PROBS.log() if as_logits else PROBS  # softmax(log p) = p: logits give the same numbers
    metrics.update(preds[:4], TARGET[:4])
    metrics.update(preds[4:], TARGET[4:])
    result = {name: value.item() for name, value in metrics.compute().items()}
    assert result == pytest.approx({f"test/{name}": value for name, value in EXPECTED.items()}, rel=1e-5)


def test_classification_metrics_binary_goes_through_two_classes() -> None:
    metrics = classification_metrics(num_classes=2, prefix="val/")
    # Class-1 scores: positives 0.8, 0.4, negatives 0.3, 0.6 -> AUROC 3/4; predictions 1, 0, 0, 1 -> acc 1/2.
    probs_1 = torch.tensor([0.8, 0.4, 0.3, 0.6])
    metrics.update(torch.stack([1 - probs_1, probs_1], dim=1), torch.tensor([1, 1, 0, 0]))
    result = metrics.compute()
    assert result["val/acc"].item() == pytest.approx(0.5)
    assert result["val/auroc_macro"].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least 2"):
        classification_metrics(num_classes=1)
