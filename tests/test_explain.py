"""Explanation maps: the co-attention rollout on hand-built attention, the maps of a real (tiny) model, the files
written, and `umd predict --explain`."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umd_lightning.explain import (
    co_attention_rollout,
    gradcam_map,
    heat_colours,
    normalise,
    overlay,
    rollout_map,
)
from umd_lightning.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
VQA_RAD = REPO / "tests" / "data" / "vqa_rad"


def _layer(text_self, text_cross, image_self, image_cross) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor(v, dtype=torch.float32)[None]
        for k, v in zip(
            ("text_self", "text_cross", "image_self", "image_cross"), (text_self, text_cross, image_self, image_cross)
        )
    }


def test_rollout_of_one_layer_follows_the_cross_attention() -> None:
    # 2 text tokens, image = class token + 2 patches; the text first token looks only at patch 2.
    layer = _layer(
        [[1, 0], [0, 1]],
        [[0, 0, 1], [1, 0, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0.5, 0.5], [1, 0], [0, 1]],
    )
    r_ti, r_ii = co_attention_rollout([layer])
    # R_ti = 0 + A_ts @ 0 + A_tc @ I; R_ii = I + A_is @ I + A_ic @ 0 = 2 I
    assert torch.allclose(r_ti[0], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    assert torch.allclose(r_ii[0], 2 * torch.eye(3))
    assert torch.allclose(rollout_map([layer])[0], torch.tensor([0.0, 1.0]))


def test_rollout_of_two_layers_matches_the_hand_computation() -> None:
    text_self = [[0.5, 0.5], [0.5, 0.5]]
    text_cross = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    image_self = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    image_cross = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    layer = _layer(text_self, text_cross, image_self, image_cross)
    r_ti, r_ii = co_attention_rollout([layer, layer])
    a_ts, a_tc, a_is, a_ic = (torch.tensor(m) for m in (text_self, text_cross, image_self, image_cross))
    # layer 1 by hand: R_ti1 = 0 + A_ts @ 0 + A_tc @ I = A_tc; R_ii1 = I + A_is @ I + A_ic @ 0
    r_ti1, r_ii1 = a_tc, torch.eye(3) + a_is
    # layer 2 from layer 1's values
    r_ti2 = r_ti1 + a_ts @ r_ti1 + a_tc @ r_ii1
    r_ii2 = r_ii1 + a_is @ r_ii1 + a_ic @ r_ti1
    assert torch.allclose(r_ti[0], r_ti2) and torch.allclose(r_ii[0], r_ii2)
    assert torch.allclose(rollout_map([layer, layer])[0], r_ti2[0, 1:] + r_ii2[0, 1:])
    assert torch.allclose(rollout_map([layer, layer], "mean")[0], r_ti2.mean(0)[1:] + r_ii2.mean(0)[1:])


def test_normalise_overlay_and_colours() -> None:
    assert torch.equal(
        normalise(torch.tensor([[2.0, 4.0, 3.0], [1.0, 1.0, 1.0]])), torch.tensor([[0, 1, 0.5], [0, 0, 0]])
    )
    assert heat_colours(np.array([0.0, 1.0])).tolist() == [[0, 0, 255], [230, 0, 0]]
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    grid = np.array([[0.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    picture = np.asarray(overlay(image, grid))
    assert picture.shape == (8, 8, 3)
    assert picture[7, 7, 0] > 100 and picture[0, 0].sum() == 0  # red where the map is 1, untouched where 0


@pytest.fixture(scope="module")
def predictor(tiny_vqa_checkpoint: Path) -> Predictor:
    """A tiny VQA model fine-tuned for a few steps on the fixture."""
    return Predictor.from_checkpoint(tiny_vqa_checkpoint)


def test_explain_gives_the_answer_and_two_nontrivial_maps(predictor: Predictor, tmp_path: Path) -> None:
    image = sorted((VQA_RAD / "VQA_RAD Image Folder").iterdir())[0]
    question = "is there a lesion?"
    explanation = predictor.explain(image, question)
    assert [(a, pytest.approx(p, abs=1e-6)) for a, p in explanation.top] == predictor.answer(image, question)
    assert explanation.answer == explanation.top[0][0] and len(explanation.top) == 5
    grid = predictor.model.backbone.vision.grid_size(32)
    assert set(explanation.maps) == {"rollout", "gradcam"}
    for name, values in explanation.maps.items():
        assert values.shape == grid, name
    rollout, gradcam = explanation.maps["rollout"], explanation.maps["gradcam"]
    assert rollout.min() == 0.0 and rollout.max() == 1.0  # not constant: the patches differ
    # Grad-CAM is relu'd: normalised to [0, 1], or all 0 where no patch adds to the answer (a 3-step model's
    # chosen answer can be such a one; the next test finds answers that are not)
    assert gradcam.min() == 0.0 and gradcam.max() in (0.0, 1.0)
    assert explanation.image.shape == (32, 32, 3)
    other = predictor.explain(image, "what organ is shown in the picture?")
    assert not np.allclose(other.maps["rollout"], rollout)

    written = explanation.save(tmp_path, "q0")
    assert sorted(p.name for p in written) == ["q0_gradcam.npy", "q0_gradcam.png", "q0_rollout.npy", "q0_rollout.png"]
    assert np.array_equal(np.load(tmp_path / "q0_rollout.npy"), explanation.maps["rollout"])
    assert Image.open(tmp_path / "q0_gradcam.png").size == (32, 32)
    # the model's parameters kept no gradient
    assert all(p.grad is None for p in predictor.model.parameters())


def test_gradcam_shows_positive_evidence_for_some_answer_and_moves_with_the_question(predictor: Predictor) -> None:
    model = predictor.model.eval()
    image = sorted((VQA_RAD / "VQA_RAD Image Folder").iterdir())[0]
    pixels = model.transform(Image.open(image).convert("RGB")).unsqueeze(0)
    # A 3-step model's patch tokens are nearly alike, so an answer's evidence has nearly one sign over all patches,
    # and which sign is down to the seed: the run can leave every answer with none that is positive (all maps 0).
    # Negating an answer's row of the final layer negates its logit's gradient, so one of the two heads shows
    # that answer's evidence positive, whatever the seed.
    flipped = copy.deepcopy(model.head)
    with torch.no_grad():
        flipped.final.weight.neg_()
        flipped.final.bias.neg_()

    def maps(question: str) -> list[torch.Tensor]:
        """Each answer's map from the model's head plus the one from the flipped head: |Grad-CAM before relu|."""
        tokens = model.tokenizer([question], return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        summed = []
        for j in range(len(model.labels)):
            pair = [
                gradcam_map(model.backbone, h, pixels, ids, mask, torch.tensor([j]))[0] for h in (model.head, flipped)
            ]
            assert all((m >= 0).all() for m in pair)  # relu'd
            summed.append(pair[0] + pair[1])
        return summed

    lesion, organ = maps("is there a lesion?"), maps("what organ is shown in the picture?")
    varied = [j for j, m in enumerate(lesion) if m.max() > m.min()]
    assert len(varied) == len(model.labels), "an answer has no patch-dependent Grad-CAM evidence of either sign"
    assert any(not torch.allclose(lesion[j], organ[j]) for j in varied)


def test_explain_refuses_an_empty_question_and_unknown_methods(predictor: Predictor) -> None:
    image = sorted((VQA_RAD / "VQA_RAD Image Folder").iterdir())[0]
    with pytest.raises(ValueError, match="empty"):
        predictor.explain(image, "  ")
    with pytest.raises(ValueError, match="unknown explanation method"):
        predictor.explain(image, "is there a lesion?", methods=["saliency"])
