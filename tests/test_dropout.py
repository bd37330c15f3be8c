"""The CPU dropout of models/dropout.py: the masks' distribution and seeding, the masked scale and its gradient,
attention with dropped weights against a hand-written computation, and where the backbone uses them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from umd_lightning.models import UMDBackbone, preset
from umd_lightning.models.dropout import (
    TEXT_ATTENTION,
    Dropout,
    attention,
    drop_mask,
    dropout,
    text_attention,
    use_cheap_dropout,
)
from umd_lightning.models.fusion import MultiHeadAttention


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_mask_rate_in_each_quarter_of_each_draw(p):
    torch.manual_seed(0)
    count = 1_000_003  # not a multiple of 4: the last draw is part used
    mask = drop_mask((count,), p)
    assert mask.dtype == torch.bool and mask.shape == (count,)
    sigma = math.sqrt(p * (1 - p) / (count / 4))
    # Each 64-bit draw gives four elements: a draw whose top bit were fixed (as ``random_()`` without bounds
    # gives) would drop none or all of one of them.
    for quarter in range(4):
        assert abs(mask[quarter::4].float().mean().item() - p) < 5 * sigma
    # The four elements of a draw are independent: each pair's correlation is that of independent draws.
    lanes = mask[: count - count % 4].view(-1, 4).float()
    corr = torch.corrcoef(lanes.T)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(corr[i, j].item()) < 5 / math.sqrt(lanes.shape[0])


def test_drop_mask_compares_each_16_bit_quarter_of_a_draw_with_p_times_2_to_the_16():
    # The reference reads the generator's 64-bit words with shifts (not views): element 4 i + j is dropped when
    # bits 16 j .. 16 j + 15 of word i, read as a signed 16-bit number, are below -32768 + round(p * 65536).
    p, count = 0.3, 4 * 500 + 3
    torch.manual_seed(7)
    words = torch.empty(501, dtype=torch.int64).random_(-(2**63), None).tolist()
    expected = []
    for word in words:
        for j in range(4):
            lane = ((word % 2**64) >> (16 * j)) & 0xFFFF
            lane = lane - 2**16 if lane >= 2**15 else lane
            expected.append(lane < -(2**15) + round(p * 2**16))
    torch.manual_seed(7)
    assert drop_mask((count,), p).tolist() == expected[:count]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_p_next_to_0_or_1_drops_nothing_or_everything(dtype):
    # p within 2**-17 of 0 or 1 rounds to 0 or 1; near 1 the threshold is past the int16 range.
    x = torch.randn(3, 1000, dtype=dtype)
    assert not drop_mask(x.shape, 2**-18).any()
    assert drop_mask(x.shape, 1 - 2**-18).all()
    assert torch.equal(dropout(x, 2**-18), x * (1 / (1 - 2**-18)))
    assert not dropout(x, 1 - 2**-18).any()


def test_drop_mask_follows_the_seed():
    torch.manual_seed(3)
    first = drop_mask((4, 50), 0.3)
    torch.manual_seed(3)
    again = drop_mask((4, 50), 0.3)
    torch.manual_seed(4)
    other = drop_mask((4, 50), 0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dropout_zeroes_the_mask_and_scales_the_rest_forward_and_backward():
    x = torch.randn(6, 33, requires_grad=True)
    torch.manual_seed(11)
    dropped = drop_mask(x.shape, 0.4)
    torch.manual_seed(11)
    out = dropout(x, 0.4)
    expected = torch.where(dropped, 0.0, x / 0.6)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    grad = torch.randn_like(x)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(dropped, 0.0, grad / 0.6), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dropout_is_exactly_the_masked_scale_in_every_dtype(dtype):
    # The multiplier carries the scale only where the dtype holds 1 / (1 - p) as fp32 does; in bf16 it would be
    # rounded (1 / 0.9 -> 1.109), so there the scale is applied apart, in fp32, as PyTorch's scalar multiply does.
    x = torch.randn(9, 31, dtype=dtype, requires_grad=True)
    torch.manual_seed(4)
    dropped = drop_mask(x.shape, 0.1)
    torch.manual_seed(4)
    out = dropout(x, 0.1)
    assert out.dtype == dtype
    assert torch.equal(out, x.detach().masked_fill(dropped, 0).mul_(1 / 0.9))
    grad = torch.randn_like(x)
    out.backward(grad)
    assert torch.equal(x.grad, grad.masked_fill(dropped, 0).mul_(1 / 0.9))


def test_dropout_gradient_by_finite_differences():
    x = torch.randn(5, 7, dtype=torch.double, requires_grad=True)

    def seeded(t):
        torch.manual_seed(5)
        return dropout(t, 0.25)

    assert torch.autograd.gradcheck(seeded, (x,))


def test_dropout_keeps_the_mean_and_is_identity_when_off():
    torch.manual_seed(0)
    ones = torch.ones(400_000)
    assert abs(dropout(ones, 0.1).mean().item() - 1.0) < 0.005
    x = torch.randn(3, 4)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_dropout_module_follows_train_and_eval():
    module = Dropout(0.5)
    x = torch.ones(1000)
    assert (module(x) == 0).any()
    module.eval()
    assert torch.equal(module(x), x)


def _hand_attention(q, k, v, keep_keys, dropped, p):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep_keys, float("-inf"))
    weights = scores.softmax(-1)
    return torch.where(dropped, 0.0, weights / (1 - p)) @ v


def test_attention_with_dropout_matches_a_hand_computation_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen, requires_grad=True) for _ in range(3))
    keep_keys = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])[:, None, None, :]
    k2, v2 = (torch.randn(2, 3, 7, 8, generator=gen, requires_grad=True) for _ in range(2))
    torch.manual_seed(21)
    dropped = drop_mask((2, 3, 5, 7), 0.3)
    torch.manual_seed(21)
    out = attention(q, k2, v2, keep_keys, dropout_p=0.3)
    expected = _hand_attention(q, k2, v2, keep_keys, dropped, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k2, v2), grad)
    theirs = torch.autograd.grad(expected, (q, k2, v2), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Without dropout it is PyTorch's own attention.
    plain = attention(q, k, v, None, dropout_p=0.0)
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


def test_attention_adds_a_float_mask():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 1, 4, 4, generator=gen)
    torch.manual_seed(2)
    dropped = drop_mask((1, 2, 4, 4), 0.2)
    torch.manual_seed(2)
    out = attention(q, k, v, bias, dropout_p=0.2)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(8) + bias).softmax(-1)
    torch.testing.assert_close(out, torch.where(dropped, 0.0, weights / 0.8) @ v, rtol=1e-5, atol=1e-6)


def test_fusion_attention_drops_its_weights_with_the_cheap_masks():
    torch.manual_seed(0)
    module = MultiHeadAttention(16, 2, dropout=0.3)
    x, other = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    key_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    torch.manual_seed(9)
    out = module(x, other, key_mask)
    q, k, v = module._split(module.query(x)), module._split(module.key(other)), module._split(module.value(other))
    torch.manual_seed(9)
    dropped = drop_mask((2, 2, 5, 6), 0.3)
    expected = _hand_attention(q, k, v, key_mask[:, None, None, :], dropped, 0.3)
    torch.testing.assert_close(out, module.out(expected.transpose(1, 2).flatten(2)), rtol=1e-5, atol=1e-6)


def test_text_attention_hands_everything_but_training_dropout_to_transformers():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    module = nn.Module()
    module.is_causal = False
    ours, _ = text_attention(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.manual_seed(4)
    ours, _ = text_attention(module, q, k, v, mask, dropout=0.2, scaling=0.3)
    torch.manual_seed(4)
    expected = attention(q, k, v, mask, 0.2, 0.3).transpose(1, 2)
    assert ours.shape == (2, 6, 2, 8)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_under_cpu_bf16_autocast_runs_the_fused_kernel_in_fp32(mask_kind):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    mask = {
        "none": None,
        "bool": torch.tensor([[True] * 9, [True] * 5 + [False] * 4])[:, None, None, :],
        "float": torch.randn(2, 1, 9, 9, generator=gen).bfloat16(),
    }[mask_kind]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    upcast = [t.detach().float().requires_grad_() for t in (q, k, v)]
    fp32_mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    expected = F.scaled_dot_product_attention(*upcast, attn_mask=fp32_mask)
    torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=gen).bfloat16()
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(expected, upcast, grad.float())
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b.bfloat16(), rtol=0, atol=0)
    # without autocast it is PyTorch's call as it is
    plain = attention(*(t.detach().float() for t in (q, k, v)), fp32_mask)
    torch.testing.assert_close(plain, expected.detach(), rtol=0, atol=0)


def test_text_attention_under_bf16_autocast_takes_the_fp32_kernel():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen).bfloat16() for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    module = nn.Module()
    module.is_causal = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = text_attention(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ours, expected.bfloat16().transpose(1, 2), rtol=0, atol=0)


def test_timm_attention_in_the_vision_tower_and_mim_decoder_is_tower_attention():
    from timm.layers import Attention

    from umd_lightning.models.heads import MIMDecoder
    from umd_lightning.models.vision import TowerAttention, use_tower_attention

    cfg = preset("tiny")
    backbone = UMDBackbone(cfg)
    decoder = MIMDecoder(cfg.fusion.width, cfg.decoder, cfg.vision.patch_size, cfg.vision.width)
    for module in (backbone.vision, decoder):
        found = [m for m in module.modules() if isinstance(m, Attention)]
        assert found and all(type(m) is TowerAttention for m in found)
    # No state of its own: the keys of a freshly switched block are timm's.
    block = Attention(16, num_heads=2, qkv_bias=True)
    keys = set(block.state_dict())
    assert use_tower_attention(nn.Sequential(block)) == 1 and type(block) is TowerAttention
    assert set(block.state_dict()) == keys
    x = torch.randn(2, 7, 16)
    block.train()
    # fp32: timm's computation exactly; bf16 autocast: the same with the attention itself in fp32.
    torch.testing.assert_close(block(x), Attention.forward(block, x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = block(x)
        qkv = block.qkv(x).reshape(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
        with torch.autocast("cpu", enabled=False):
            mixed = F.scaled_dot_product_attention(*(t.float() for t in qkv.unbind(0))).bfloat16()
        expected = block.proj(mixed.transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # Dropped attention weights are drawn by drop_mask, as in the fusion.
    block.attn_drop.p = 0.25
    torch.manual_seed(8)
    out = block(x)
    q, k, v = block.qkv(x).reshape(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    torch.manual_seed(8)
    dropped = drop_mask((2, 2, 7, 7), 0.25)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    hand = _hand_attention(q, k, v, keep, dropped, 0.25)
    torch.testing.assert_close(out, block.proj(hand.transpose(1, 2).reshape(2, 7, 16)), rtol=1e-5, atol=1e-6)


def test_the_backbone_uses_them_and_its_state_dict_is_unchanged():
    tiny = preset("tiny")
    text_overrides = {**tiny.text.overrides, "hidden_dropout_prob": 0.1}
    backbone = UMDBackbone(preset("tiny", {"fusion.dropout": 0.1, "text.overrides": text_overrides}))
    encoder = backbone.text.encoder
    assert encoder.config._attn_implementation == TEXT_ATTENTION
    assert not [name for name, m in backbone.named_modules() if type(m) is nn.Dropout]
    assert any(isinstance(m, Dropout) and m.p == 0.1 for m in encoder.modules())
    # Same keys as a model built with plain dropout modules: nothing to convert in checkpoints.
    plain = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2))
    keys = set(plain.state_dict())
    assert use_cheap_dropout(plain) == 1 and set(plain.state_dict()) == keys and plain[1].p == 0.2
    # In evaluation the text tower computes exactly what transformers' own SDPA attention does.
    backbone.eval()
    ids = torch.randint(5, 100, (2, 9))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    ours = backbone.text(ids, am)
    encoder.set_attn_implementation("sdpa")
    torch.testing.assert_close(backbone.text(ids, am), ours, rtol=0, atol=0)


def test_a_pickled_backbone_runs_in_a_fresh_process(tmp_path):
    # A spawned DDP worker or a pickled model object names "umd_sdpa" in its text config; unpickling must find it.
    import subprocess
    import sys

    backbone = UMDBackbone(preset("tiny"))
    path = tmp_path / "backbone.pt"
    torch.save(backbone, path)
    script = (
        f"import torch; b = torch.load({str(path)!r}, weights_only=False); b.train();"
        "ids = torch.randint(5, 100, (2, 7)); out = b.text(ids, torch.ones(2, 7, dtype=torch.long));"
        "print(b.text.encoder.config._attn_implementation, tuple(out.shape))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == TEXT_ATTENTION
