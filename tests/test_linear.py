"""models/linear.py: CPU fp32 linears on oneDNN. Products and gradients against float64, the cases handed back
to ``F.linear``, and every linear of the three stages taking the path with the same losses as PyTorch's own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from umd_lightning.models import linear as L
from umd_lightning.stages import FineTune, MRPretrain, TDCalib

needs_onednn = pytest.mark.skipif(L._ONEDNN_LINEAR is None, reason="this PyTorch has no oneDNN linear (not x86-64)")


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the oneDNN product."""
    calls = []
    real = L._ONEDNN_LINEAR

    def product(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(L, "_ONEDNN_LINEAR", product)
    return calls


@needs_onednn
@pytest.mark.parametrize(
    ("shape", "out", "bias", "transposed"),
    [((3, 5, 7), 4, True, False), ((6, 7), 1, False, False), ((7, 6), 9, True, True), ((2, 3, 4, 7), 5, True, False)],
)
def test_product_and_gradients_match_float64(shape, out, bias, transposed, counted):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    if transposed:  # a non-contiguous input
        x = torch.randn(*reversed(shape)).t()
    x.requires_grad_()
    weight = torch.randn(out, x.shape[-1], requires_grad=True)
    b = torch.randn(out, requires_grad=True) if bias else None
    y = L.linear(x, weight, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert len(counted) == 3  # the product, the input's gradient, the weight's gradient
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = F.linear(x64, w64, b64)
    y64.backward(grad.double())
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), y64, **close)
    torch.testing.assert_close(x.grad.double(), x64.grad, **close)
    torch.testing.assert_close(weight.grad.double(), w64.grad, **close)
    if bias:
        torch.testing.assert_close(b.grad.double(), b64.grad, **close)


@needs_onednn
def test_only_the_gradients_asked_for_are_computed(counted):
    x = torch.randn(4, 6)
    frozen = torch.randn(3, 6)
    bias = torch.randn(3, requires_grad=True)
    L.linear(x, frozen, bias).sum().backward()
    assert len(counted) == 1 and bias.grad is not None  # no product for x's or the weight's gradient
    with torch.no_grad():
        plain = L.linear(x, frozen, bias)
    assert len(counted) == 2
    torch.testing.assert_close(plain, L.linear(x, frozen, bias.detach()), rtol=0, atol=0)


@needs_onednn
def test_everything_else_goes_to_f_linear(counted, monkeypatch):
    weight = torch.randn(3, 6)
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L.linear(x, weight).dtype == torch.bfloat16
    double = torch.randn(4, 6, dtype=torch.double)
    assert torch.equal(L.linear(double, weight.double()), F.linear(double, weight.double()))
    assert L.linear(torch.randn(0, 6), weight).shape == (0, 3)
    assert counted == []
    monkeypatch.setattr(L, "CPU_MATMUL", "aten")
    assert torch.equal(L.linear(x, weight), F.linear(x, weight))
    assert counted == []


def test_switching_a_module_keeps_its_state_dict_and_its_output():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 6)
    expected = model(x)
    assert L.use_onednn_linear(model) == 2
    assert all(type(m) is L.Linear for m in (model[0], model[2]))
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def _stages():
    common = {"preset": "tiny", "text_model": "minilm"}
    return [
        MRPretrain(**common, itc_weight=0.5),
        TDCalib(**common),
        FineTune(**common, task="vqa", num_outputs=7),
        FineTune(**common, task="retrieval", itc_weight=0.5),
    ]


def test_no_plain_linear_is_left_in_any_stage():
    for stage in _stages():
        plain = [name for name, module in stage.named_modules() if type(module) is nn.Linear]
        assert plain == [], f"{type(stage).__name__}: {plain}"


def _pretrain_losses(seed: int):
    torch.manual_seed(seed)
    model = MRPretrain(preset="tiny", text_model="minilm", itc_weight=0.5)
    model.teacher.copy_from(model.backbone)
    model.eval()  # no dropout: the two runs differ only in how the products are computed
    gen = torch.Generator().manual_seed(seed)
    size = model.backbone_config.image_size
    ids = torch.randint(1000, 2000, (4, 12), generator=gen)
    ids[:, 0] = 101
    batch = {
        "pixel_values": torch.randn(4, 3, size, size, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mlm_input_ids": torch.where(torch.arange(12) % 4 == 1, 103, ids),
        "mlm_labels": torch.where(torch.arange(12) % 4 == 1, ids, -100),
    }
    torch.manual_seed(seed)
    terms, _ = model.reconstruction_losses(batch)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


@needs_onednn
def test_a_pretraining_step_on_onednn_gives_pytorchs_losses_and_gradients(counted, monkeypatch):
    terms, grads = _pretrain_losses(3)
    assert len(counted) > 100  # the towers', the fusion's and the heads' products, forward and backward
    monkeypatch.setattr(L, "CPU_MATMUL", "aten")
    counted.clear()
    aten_terms, aten_grads = _pretrain_losses(3)
    assert counted == []
    assert terms.keys() == aten_terms.keys() and len(terms) >= 5
    for name, value in terms.items():
        torch.testing.assert_close(value, aten_terms[name], rtol=1e-4, atol=1e-5, msg=name)
    assert grads.keys() == aten_grads.keys()
    for name, grad in grads.items():
        scale = aten_grads[name].abs().max().item()
        assert (grad - aten_grads[name]).abs().max().item() <= 1e-3 * scale + 1e-7, name


@needs_onednn
def test_the_flop_counter_counts_the_onednn_products():
    x = torch.randn(5, 3, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        L.linear(x, weight).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 15 * 8 * 4  # the product and both gradients


def test_a_wrong_umd_cpu_matmul_is_named_at_import():
    env = {**os.environ, "UMD_CPU_MATMUL": "mkl"}
    done = subprocess.run(
        [sys.executable, "-c", "import umd_lightning.models"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "UMD_CPU_MATMUL='mkl'" in done.stderr and "onednn or aten" in done.stderr
