"""GM-Coord (UMD_SPEC 4.2): the arithmetic against hand-computed numbers, and the callback in a real Trainer."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from umd_lightning.callbacks import gm_coord
from umd_lightning.callbacks.gm_coord import (
    GMCoord,
    GMCoordInputs,
    coefficients,
    noise_generator,
    rescale_,
    scores,
    unimodal_logits,
)

TANH_01, TANH_02, TANH_03, TANH_04 = (
    0.09966799462495582,
    0.197375320224904,
    0.2913126124515909,
    0.3799489622552249,
)

# ------------------------------------------------------------------------------------------------------------
# Pure functions


def test_scores_hand_computed() -> None:
    # Row 0: softmax [0, 0] = [.5, .5], true class 1 -> .5;
    # row 1: softmax [ln 3, 0] = [.75, .25], true class 0 -> .75.
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert scores(z, torch.tensor([1, 0])).item() == pytest.approx(1.25)
    assert scores(z, torch.tensor([0, 1])).item() == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("s_t", "s_v", "formula", "rho_t", "k_t", "k_v"),
    [
        # text ahead, rho_t = 2: reference damps text by 1 - tanh(0.1 * 2), relu_shift by 1 - tanh(0.1 * 1).
        (3.0, 1.5, "reference", 2.0, 1 - TANH_02, 1.0),
        (3.0, 1.5, "relu_shift", 2.0, 1 - TANH_01, 1.0),
        # image ahead, rho_t = 0.25, rho_v = 4: image damped by 1 - tanh(0.1 * 4), resp. 1 - tanh(0.1 * 3).
        (1.0, 4.0, "reference", 0.25, 1.0, 1 - TANH_04),
        (1.0, 4.0, "relu_shift", 0.25, 1.0, 1 - TANH_03),
        # rho_t = 1 exactly: reference takes the image branch (its jump), relu_shift leaves both alone.
        (2.0, 2.0, "reference", 1.0, 1.0, 1 - TANH_01),
        (2.0, 2.0, "relu_shift", 1.0, 1.0, 1.0),
    ],
)
def test_coefficients_hand_computed(s_t: float, s_v: float, formula: str, rho_t: float, k_t: float, k_v: float) -> None:
    got = coefficients(s_t, s_v, alpha=0.1, formula=formula, eps=1e-8)
    assert [value.item() for value in got] == pytest.approx([rho_t, k_t, k_v], rel=1e-6)


def test_relu_shift_is_continuous_at_one_and_reference_is_not() -> None:
    below = coefficients(1.0 - 1e-4, 1.0, alpha=0.1, formula="relu_shift")
    above = coefficients(1.0 + 1e-4, 1.0, alpha=0.1, formula="relu_shift")
    for side in (below, above):
        assert side[1].item() == pytest.approx(1.0, abs=2e-5)
        assert side[2].item() == pytest.approx(1.0, abs=2e-5)
    ref_below = coefficients(1.0 - 1e-4, 1.0, alpha=0.1, formula="reference")
    ref_above = coefficients(1.0 + 1e-4, 1.0, alpha=0.1, formula="reference")
    assert ref_below[2].item() == pytest.approx(1 - TANH_01, abs=1e-4)  # image damped just below 1
    assert ref_above[1].item() == pytest.approx(1 - TANH_01, abs=1e-4)  # text damped just above 1


def test_coefficients_guard_zero_scores() -> None:
    rho_t, k_t, k_v = coefficients(2.0, 0.0, alpha=0.1, formula="reference")
    assert torch.isfinite(rho_t) and k_t.item() == pytest.approx(0.0) and k_v.item() == 1.0
    rho_t, k_t, k_v = coefficients(0.0, 2.0, alpha=0.1, formula="reference")
    assert rho_t.item() == 0.0 and k_t.item() == 1.0 and k_v.item() == pytest.approx(0.0)


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


W = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [1.0, 1.0, -1.0, 0.0]]
B = [2.0, 0.0, -2.0]
H_T, H_V = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])


def test_unimodal_reference_uses_only_the_final_linear() -> None:
    # z_t = h_t W[:, :2]^T + b/2 = [1, 2, 3] + [1, 0, -1]
    # z_v = h_v W[:, 2:]^T + b/2 = [-1, 3, -3] + [1, 0, -1]
    head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), _linear(W, B))
    z_t, z_v = unimodal_logits(head, H_T, H_V, "reference")
    assert torch.equal(z_t, torch.tensor([[2.0, 2.0, 2.0]]))
    assert torch.equal(z_v, torch.tensor([[0.0, 3.0, -4.0]]))


def test_unimodal_zero_other_runs_the_whole_head() -> None:
    # Single Linear head: z_t = W [1, 2, 0, 0] + b = [3, 2, 1]; z_v = W [0, 0, 3, -1] + b = [1, 3, -5].
    z_t, z_v = unimodal_logits(_linear(W, B), H_T, H_V, "zero_other")
    assert torch.equal(z_t, torch.tensor([[3.0, 2.0, 1.0]]))
    assert torch.equal(z_v, torch.tensor([[1.0, 3.0, -5.0]]))
    # A deeper head: the full head on [h_t ; 0], which the reference split does not reproduce.
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 3))
    z_t, _ = unimodal_logits(head, H_T, H_V, "zero_other")
    assert torch.allclose(z_t, head(torch.tensor([[1.0, 2.0, 0.0, 0.0]])))
    assert not torch.allclose(z_t, unimodal_logits(head, H_T, H_V, "reference")[0])


def test_unimodal_retrieval_candidates_squeeze_to_b_c() -> None:
    # Retrieval head Linear(4, 1), W = [1, 2, 3, 4], b = 1: candidate scores are dot products + 0.5.
    head = _linear([[1.0, 2.0, 3.0, 4.0]], [1.0])
    h_t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, C=2, D=2)
    h_v = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    z_t, z_v = unimodal_logits(head, h_t, h_v, "reference")
    assert torch.equal(z_t, torch.tensor([[1.5, 2.5]]))
    assert torch.equal(z_v, torch.tensor([[7.5, 0.5]]))
    z_t, z_v = unimodal_logits(head, h_t, h_v, "zero_other")
    assert torch.equal(z_t, torch.tensor([[2.0, 3.0]]))
    assert torch.equal(z_v, torch.tensor([[8.0, 1.0]]))


def _param_with_grad(grad: Tensor) -> nn.Parameter:
    param = nn.Parameter(torch.zeros_like(grad))
    param.grad = grad.clone()
    return param


def test_rescale_without_noise_is_exact() -> None:
    param = _param_with_grad(torch.tensor([1.0, -2.0, 4.0]))
    frozen = nn.Parameter(torch.ones(2))
    rescale_([param, frozen], 0.25, noise=False)
    assert torch.equal(param.grad, torch.tensor([0.25, -0.5, 1.0]))
    assert frozen.grad is None


@pytest.mark.parametrize(("k", "noise_scale"), [(1.0, 0.5), (0.3, 2.0)])
def test_rescale_noise_std_follows_gradient_before_rescaling(k: float, noise_scale: float) -> None:
    before = torch.randn(512, 512, generator=torch.Generator().manual_seed(1)) * 3.0
    param = _param_with_grad(before)
    rescale_([param], k, noise=True, noise_scale=noise_scale, generator=torch.Generator().manual_seed(2))
    added = param.grad - k * before
    # std of the *un-rescaled* gradient times noise_scale, not the rescaled one's.
    assert added.std().item() == pytest.approx(before.std().item() * noise_scale, rel=0.01)
    assert abs(added.mean().item()) < 0.01 * added.std().item()


def test_rescale_noise_is_reproducible_and_skips_missing_grads() -> None:
    grad = torch.randn(50)
    alone, after_none = _param_with_grad(grad), _param_with_grad(grad)
    rescale_([alone], 0.5, True, 1.0, noise_generator(3, 7))
    rescale_([nn.Parameter(torch.ones(4)), after_none], 0.5, True, 1.0, noise_generator(3, 7))
    assert torch.equal(alone.grad, after_none.grad)
    for seed, step in ((3, 8), (4, 7), (0, 7)):  # another step or another seed: other noise
        other = _param_with_grad(grad)
        rescale_([other], 0.5, True, 1.0, noise_generator(seed, step))
        assert not torch.equal(alone.grad, other.grad), (seed, step)


def test_cpu_noise_comes_from_per_parameter_seeds_whatever_the_thread_count() -> None:
    grads = [torch.randn(300, 7), torch.randn(5), torch.randn(2, 3, 4)]
    results = []
    for threads in (1, 2, 3):
        params = [_param_with_grad(g) for g in grads]
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            rescale_(params, 0.5, True, 2.0, noise_generator(5, 9))
        finally:
            torch.set_num_threads(previous)
        results.append([p.grad for p in params])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    # By hand: one 32-bit seed per gradient from the step's generator, in order; N(0, 1) from each seed.
    seeds = torch.randint(0, 2**32, (3,), generator=noise_generator(5, 9)).tolist()
    for grad, seed, got in zip(grads, seeds, results[0], strict=True):
        normals = torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed))
        expected = 0.5 * grad + normals * (grad.std() + 1e-8) * 2.0
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# The callback in a Trainer, on a toy module following the GMCoordModule contract

D, TEXT_IN, IMAGE_IN, CLASSES = 16, 256, 200, 3


class ToyBackbone(nn.Module):
    """Towers, projections and fusion layers, plus what GM-Coord must leave alone (poolers, type embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.text_tower, self.image_tower = nn.Linear(TEXT_IN, D), nn.Linear(IMAGE_IN, D)
        self.text_proj, self.image_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.text_fusion, self.image_fusion = nn.Linear(2 * D, D), nn.Linear(2 * D, D)
        self.text_pooler, self.image_pooler = nn.Linear(D, D), nn.Linear(D, D)
        self.type_embedding = nn.Embedding(2, D)

    def forward(self, text: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        t = self.text_proj(self.text_tower(text)) + self.type_embedding.weight[0]
        v = self.image_proj(self.image_tower(image)) + self.type_embedding.weight[1]
        t, v = (
            torch.tanh(self.text_fusion(torch.cat([t, v], -1))),
            torch.tanh(self.image_fusion(torch.cat([v, t], -1))),
        )
        return torch.tanh(self.text_pooler(t)), torch.tanh(self.image_pooler(v))


class ToyModule(pl.LightningModule):
    """Records the hook order, the inputs it hands GM-Coord and the gradients after all callbacks ran."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.backbone = ToyBackbone()
        self.head = nn.Sequential(nn.Linear(2 * D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, CLASSES))
        self.lr = lr
        self.gm_coord_inputs: GMCoordInputs | None = None
        self.events: list[str] = []
        self.sent_inputs: list[GMCoordInputs] = []
        self.grads_after: list[dict[str, Tensor]] = []
        self.stats: list[dict[str, float]] = []

    def gm_coord_modalities(self) -> dict[str, list[nn.Module]]:
        bb = self.backbone
        return {
            "text": [bb.text_tower, bb.text_proj, bb.text_fusion],
            "image": [bb.image_tower, bb.image_proj, bb.image_fusion],
        }

    def gm_coord_head(self) -> nn.Module:
        return self.head

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        text, image, target = batch
        h_t, h_v = self.backbone(text, image)
        self.gm_coord_inputs = GMCoordInputs(text=h_t.detach(), image=h_v.detach(), target=target)
        self.sent_inputs.append(self.gm_coord_inputs)
        self.events.append("training_step")
        return nn.functional.cross_entropy(self.head(torch.cat([h_t, h_v], -1)), target)

    def on_after_backward(self) -> None:
        self.events.append("after_backward")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The module's hook runs after every callback's: these are the gradients the optimiser will use.
        self.events.append("before_optimizer_step")
        self.grads_after.append(_grads(self))
        gm = next(cb for cb in self.trainer.callbacks if isinstance(cb, GMCoord))
        self.stats.append(dict(gm.last_stats))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GradRecorder(pl.Callback):
    """Listed before GMCoord: records the gradients GM-Coord receives."""

    def __init__(self) -> None:
        self.grads_before: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.grads_before.append(_grads(pl_module))


def _grads(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _fit(gm: GMCoord, module: ToyModule, steps: int, accumulate: int = 1, epochs: int = 1) -> GradRecorder:
    generator = torch.Generator().manual_seed(0)
    n = 4 * steps * accumulate
    data = TensorDataset(
        torch.randn(n, TEXT_IN, generator=generator),
        torch.randn(n, IMAGE_IN, generator=generator),
        torch.randint(0, CLASSES, (n,), generator=generator),
    )
    recorder = GradRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        callbacks=[recorder, gm],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    return recorder


TEXT_SIDE = ("text_tower", "text_proj", "text_fusion")
IMAGE_SIDE = ("image_tower", "image_proj", "image_fusion")


def _side(name: str) -> str | None:
    for prefix, side in [(p, "text") for p in TEXT_SIDE] + [(p, "image") for p in IMAGE_SIDE]:
        if name.startswith(f"backbone.{prefix}."):
            return side
    return None


def test_only_text_and_image_side_gradients_are_scaled() -> None:
    torch.manual_seed(0)
    module = ToyModule()
    gm = GMCoord(alpha=0.5, noise=False)
    recorder = _fit(gm, module, steps=2)
    assert len(module.stats) == 2
    for before, after, stats in zip(recorder.grads_before, module.grads_after, module.stats):
        assert min(stats["k_t"], stats["k_v"]) < 0.95  # something was actually damped
        k = {"text": stats["k_t"], "image": stats["k_v"]}
        assert before.keys() == after.keys()
        for name, grad in before.items():
            side = _side(name)
            if side is None:  # poolers, type embedding, head: untouched, bit for bit
                assert torch.equal(after[name], grad), name
            else:
                assert torch.allclose(after[name], k[side] * grad, rtol=1e-6, atol=0), name
    assert {_side(name) for name in recorder.grads_before[0]} == {"text", "image", None}
    logged = module.trainer.callback_metrics
    for name in ("s_t", "s_v", "rho_t", "k_t", "k_v"):
        assert logged[f"gm_coord/{name}"].item() == pytest.approx(module.stats[-1][name]), name


def test_noise_std_matches_gradient_std_times_scale() -> None:
    torch.manual_seed(0)
    module = ToyModule()
    gm = GMCoord(alpha=0.5, noise=True, noise_scale=0.5, seed=11)
    recorder = _fit(gm, module, steps=1)
    before, after, stats = recorder.grads_before[0], module.grads_after[0], module.stats[0]
    for name, k in (
        ("backbone.text_tower.weight", stats["k_t"]),
        ("backbone.image_tower.weight", stats["k_v"]),
    ):
        added = after[name] - k * before[name]
        assert added.std().item() == pytest.approx(before[name].std().item() * 0.5, rel=0.05), name
    assert min(stats["k_t"], stats["k_v"]) < 0.95 and max(stats["k_t"], stats["k_v"]) == 1.0  # k < 1 and k = 1
    assert torch.equal(after["head.3.weight"], before["head.3.weight"])


def test_epoch_window() -> None:
    torch.manual_seed(0)
    module = ToyModule()
    gm = GMCoord(alpha=0.5, noise=True, start_epoch=1, end_epoch=2)
    recorder = _fit(gm, module, steps=2, epochs=3)  # 2 optimiser steps per epoch
    changed = [
        any(not torch.equal(before[name], after[name]) for name in before)
        for before, after in zip(recorder.grads_before, module.grads_after)
    ]
    assert changed == [False, False, True, True, False, False]


def test_gradient_accumulation_sums_micro_batches_and_rescales_once_per_step(monkeypatch) -> None:
    calls: list[float] = []
    original = gm_coord.rescale_

    def counting_rescale(params, k, *args, **kwargs) -> None:
        calls.append(float(k))
        original(params, k, *args, **kwargs)

    monkeypatch.setattr(gm_coord, "rescale_", counting_rescale)
    torch.manual_seed(0)
    module = ToyModule(lr=0.0)  # weights stay put, so the scores can be recomputed afterwards
    gm = GMCoord(alpha=0.5, noise=False)
    _fit(gm, module, steps=3, accumulate=2)

    # Lightning 2.x order: on_before_optimizer_step follows the last micro-batch's backward, once per step.
    assert module.events == (["training_step", "after_backward"] * 2 + ["before_optimizer_step"]) * 3
    assert len(calls) == 2 * 3  # text and image, once per optimiser step

    def micro_scores(inputs: GMCoordInputs) -> tuple[float, float]:
        z_t, z_v = unimodal_logits(module.head, inputs.text, inputs.image, "reference")
        return scores(z_t, inputs.target).item(), scores(z_v, inputs.target).item()

    micro = [micro_scores(inputs) for inputs in module.sent_inputs]
    assert len(micro) == 6
    for step, stats in enumerate(module.stats):
        first, second = micro[2 * step], micro[2 * step + 1]
        assert stats["s_t"] == pytest.approx(first[0] + second[0], rel=1e-6)
        assert stats["s_v"] == pytest.approx(first[1] + second[1], rel=1e-6)
        assert stats["rho_t"] == pytest.approx(stats["s_t"] / stats["s_v"], rel=1e-6)
    assert module.gm_coord_inputs is None  # consumed by the callback


def test_missing_inputs_fail_loudly() -> None:
    class Forgetful(ToyModule):
        def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            self.gm_coord_inputs = None
            return loss

    with pytest.raises(RuntimeError, match="gm_coord_inputs"):
        _fit(GMCoord(), Forgetful(), steps=1)


def test_state_dict_round_trip_keeps_seed_and_partial_sums() -> None:
    gm = GMCoord(seed=5)
    gm._run_seed, gm._sums = 5, torch.tensor([1.5, 0.5, 4.0])
    restored = GMCoord()
    restored.load_state_dict(gm.state_dict())
    assert restored._run_seed == 5 and torch.equal(restored._sums, torch.tensor([1.5, 0.5, 4.0]))


@pytest.mark.parametrize(
    "kwargs",
    [{"unimodal": "other"}, {"formula": "tanh"}, {"alpha": -1.0}, {"start_epoch": 2, "end_epoch": 2}],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GMCoord(**kwargs)
