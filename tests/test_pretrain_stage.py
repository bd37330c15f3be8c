"""MR-Pretrain: EMA arithmetic, optimiser groups, gradient flow of the feature losses, ITM swaps, over-fitting."""

import pytest
import torch

from umd_lightning.models.ema import EMATeacher
from umd_lightning.stages import MRPretrain, StageError

MASK_ID = 103


def make_batch(batch_size: int = 4, length: int = 10, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 3000, (batch_size, length), generator=gen)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[0, -3:] = 0  # padding in the first sample
    mlm_input_ids = input_ids.clone()
    labels = torch.full_like(input_ids, -100)
    for position in (2, 3):
        labels[:, position] = input_ids[:, position]
        mlm_input_ids[:, position] = MASK_ID
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=gen),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": labels,
    }


def tiny(**kwargs) -> MRPretrain:
    torch.manual_seed(0)
    return MRPretrain(preset="tiny", text_model="minilm", **kwargs)


def test_ema_update_arithmetic():
    student = torch.nn.Linear(3, 2)
    teacher = EMATeacher(student, momentum=0.9)
    before = teacher.module.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.module.weight, 0.9 * before + 0.1 * student.weight.detach())
    assert not teacher.module.weight.requires_grad
    teacher.train()
    assert not teacher.module.training


def test_teacher_gets_no_gradient_and_is_not_optimised():
    model = tiny()
    terms, _ = model.reconstruction_losses(make_batch())
    terms["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grouped = {id(p) for group in model.parameter_groups() for p in group["params"]}
    assert not grouped & {id(p) for p in model.teacher.parameters()}
    trainable = {id(p) for n, p in model.named_parameters() if not n.startswith("teacher.")}
    assert grouped == trainable


def test_parameter_groups_lr_multipliers_and_no_decay():
    model = tiny(lr=1e-3, lr_mult=5.0, head_lr_mult=7.0, weight_decay=0.05)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["tower"]["lr"] == pytest.approx(1e-3)
    assert groups["fusion"]["lr"] == pytest.approx(5e-3)
    assert groups["head"]["lr"] == pytest.approx(7e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    for name, group in groups.items():
        for param in group["params"]:
            decays = param.ndim > 1 and not names[id(param)].endswith(".bias")
            assert decays == (group["weight_decay"] == 0.05), (name, names[id(param)])
    fusion_ids = {id(p) for p in model.backbone.fusion.parameters()}
    assert fusion_ids <= {id(p) for g in ("fusion", "fusion_no_decay") for p in groups[g]["params"]}


def _grad_norms(model: MRPretrain) -> dict[str, float]:
    parts = {"vision": model.backbone.vision, "text": model.backbone.text, "fusion": model.backbone.fusion}
    return {
        name: sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None)
        for name, part in parts.items()
    }


@pytest.mark.parametrize("term", ["feamim", "feamlm"])
def test_predictive_feature_losses_reach_both_towers_and_fusion(term):
    weights = {"w_itm": 0.0, "w_mim": 0.0, "w_mlm": 0.0, "w_feamim": 0.0, "w_feamlm": 0.0}
    weights[f"w_{term}"] = 1.0
    model = tiny(**weights)
    terms, _ = model.reconstruction_losses(make_batch())
    assert set(terms) == {term, "loss"}
    terms[term].backward()
    norms = _grad_norms(model)
    assert all(value > 0 for value in norms.values()), norms


def test_reference_feamim_sends_no_gradient_to_the_encoders():
    model = tiny(feature_loss="reference", w_itm=0.0, w_mim=0.0, w_mlm=0.0, w_feamlm=0.0)
    terms, _ = model.reconstruction_losses(make_batch())
    terms["feamim"].backward()
    assert _grad_norms(model) == {"vision": 0.0, "text": 0.0, "fusion": 0.0}
    assert model.mim_decoder.mask_token.grad.abs().sum() > 0


def test_zero_weight_skips_the_term_and_its_module():
    model = tiny(w_itm=0.0, w_feamim=0.0, w_feamlm=0.0)
    assert model.itm_head is None and model.teacher is None and model.feamlm_predictor is None
    terms, _ = model.reconstruction_losses(make_batch())
    assert set(terms) == {"mim", "mlm", "loss"}
    assert terms["loss"].item() == pytest.approx(0.5 * (terms["mim"].item() + terms["mlm"].item()), rel=1e-5)


def test_separate_mask_mode_runs_both_passes():
    model = tiny(mask_mode="separate")
    terms, _ = model.reconstruction_losses(make_batch())
    assert set(terms) == {"mim", "mlm", "feamim", "feamlm", "itm", "loss"}


@pytest.mark.parametrize("mask_mode", ["joint", "separate"])
def test_one_text_tower_call_serves_every_student_pass(mask_mode):
    # The student's passes share one call of the text tower (stacked along the batch); each pass must still get
    # its own texts: recomputed pass by pass through the backbone's forward, the terms are the same (evaluation
    # mode, so that no dropout draw differs).
    from umd_lightning import losses
    from umd_lightning.models.masking import normalized_pixel_targets, patchify, random_masking
    from umd_lightning.stages.reconstruction import fusion_layer

    model = tiny(mask_mode=mask_mode).eval()
    batch = make_batch()
    backbone = model.backbone
    calls = []
    embed_text = backbone.embed_text
    backbone.embed_text = lambda ids, mask: calls.append(ids.shape[0]) or embed_text(ids, mask)
    terms, _ = model.reconstruction_losses(batch, torch.Generator().manual_seed(3))
    del backbone.embed_text
    assert calls == [4 * (2 if mask_mode == "joint" else 3)]

    pixels, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    gen = torch.Generator().manual_seed(3)
    keep, mask = random_masking(4, 16, 0.75, None, gen)
    itm_pixels, itm_labels = model.swap_images(pixels, gen)
    with torch.no_grad():
        text_out = backbone(pixels, batch["mlm_input_ids"], am, keep if mask_mode == "joint" else None)
        image_out = backbone(pixels, batch["mlm_input_ids"] if mask_mode == "joint" else ids, am, keep)
        itm_out = backbone(itm_pixels, ids, am)
        masked = batch["mlm_labels"] != losses.IGNORE_INDEX
        mlm = losses.mlm_loss(model.mlm_head(text_out.text_feats[masked]), batch["mlm_labels"][masked])
        tokens = fusion_layer(image_out.image_layers, model.backbone_config.decoder.mim_layer)
        pixel_pred, _ = model.mim_decoder(tokens, keep, (4, 4))
        mim = losses.mim_loss(pixel_pred, normalized_pixel_targets(patchify(pixels, 8)), mask)
        itm = losses.itm_loss(model.itm_head(itm_out.pooled), itm_labels)
    for name, expected in (("mlm", mlm), ("mim", mim), ("itm", itm)):
        assert terms[name].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6), name


def test_total_loss_weights():
    model = tiny(alpha=0.25, w_itm=2.0, w_mim=3.0)
    terms, _ = model.reconstruction_losses(make_batch())
    expected = 2.0 * terms["itm"] + 0.25 * (3.0 * terms["mim"] + terms["mlm"] + terms["feamim"] + terms["feamlm"])
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_itm_swaps_never_give_a_sample_its_own_image():
    model = tiny()
    pixels = torch.arange(8, dtype=torch.float).view(8, 1, 1, 1).expand(8, 3, 2, 2)
    swapped_total = 0
    for seed in range(50):
        out, labels = model.swap_images(pixels, torch.Generator().manual_seed(seed))
        source = out[:, 0, 0, 0].long()
        own = source == torch.arange(8)
        assert torch.equal(own, labels.bool())
        swapped_total += int((~own).sum())
    assert 0.35 < swapped_total / 400 < 0.65
    with pytest.raises(StageError, match="at least 2 samples"):
        model.swap_images(pixels[:1])


def test_mim_layer_out_of_range_is_a_clear_error():
    model = MRPretrain(preset="tiny", text_model="minilm", backbone_overrides={"decoder.mim_layer": 5})
    with pytest.raises(StageError, match="mim_layer=5"):
        model.reconstruction_losses(make_batch())


@pytest.mark.slow
def test_fixed_batch_overfits():
    model = tiny(lr=1e-3)
    model.teacher.copy_from(model.backbone)
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-3)
    batch = make_batch(batch_size=4)
    history = []
    for _ in range(120):
        terms, _ = model.reconstruction_losses(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        model.teacher.update(model.backbone)
        history.append(terms["loss"].item())
    start, end = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert end < start / 4, (start, end)
