"""The paper's towers: ``base`` builds the reference's CLIP ViT-B/16 (QuickGELU, 11 blocks, pre/post norms) and
loads the weight formats people have (OpenAI's TorchScript file, open_clip / timm files, an HF RoBERTa folder),
each written here at tiny size; a ``base`` run with random towers says so in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from pipeline_helpers import quiet_trainer
from safetensors.torch import save_file
from timm.layers import QuickGELU
from torch import nn
from transformers import RobertaConfig, RobertaModel

from umd_lightning.models import MIMDecoder, TextConfig, TextTower, VisionTower, preset
from umd_lightning.stages import FineTune
from umd_lightning.stages.base import random_towers_warning
from umd_lightning.weights import read_torchscript_state_dict, read_weights

REPO = Path(__file__).resolve().parents[1]
WIDTH, PATCH, IMAGE = 32, 16, 32
TINY_VISION = {"vision.width": WIDTH, "vision.depth": 2, "vision.heads": 2}


class _Block(nn.Module):
    """OpenAI CLIP's ResidualAttentionBlock, by its attribute names."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_1(x))


class _Visual(nn.Module):
    def __init__(self, width: int, blocks: int, tokens: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(tokens, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*(_Block(width) for _ in range(blocks)))
        self.proj = nn.Parameter(torch.randn(width, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.resblocks(x + self.class_embedding)


class _OpenAIClip(nn.Module):
    """The key layout of OpenAI's ``ViT-B-16.pt``, with a text side that must be ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = _Visual(WIDTH, blocks=3, tokens=1 + (IMAGE // PATCH) ** 2)
        self.token_embedding = nn.Embedding(10, 8)
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def tiny_quickgelu_vision(path: Path | None = None) -> VisionTower:
    cfg = preset("base", TINY_VISION).vision
    cfg.pretrained_path = str(path) if path else None
    return VisionTower(cfg, IMAGE)


def assert_openai_weights_loaded(tower: VisionTower, state: dict[str, torch.Tensor]) -> None:
    vit = tower.vit
    assert torch.equal(vit.cls_token.flatten(), state["visual.class_embedding"].float())
    assert torch.equal(vit.pos_embed[0], state["visual.positional_embedding"].float())
    blocks = "visual.transformer.resblocks"
    assert torch.equal(vit.blocks[1].attn.qkv.weight, state[f"{blocks}.1.attn.in_proj_weight"].float())
    assert torch.equal(vit.blocks[1].mlp.fc2.bias, state[f"{blocks}.1.mlp.c_proj.bias"].float())
    assert torch.equal(vit.norm_pre.weight, state["visual.ln_pre.weight"].float())
    assert torch.equal(vit.norm.bias, state["visual.ln_post.bias"].float())


def test_base_builds_the_reference_vision_tower() -> None:
    cfg = preset("base")
    assert (cfg.vision.arch, cfg.vision.depth) == ("vit_base_patch16_clip_quickgelu_224", 11)
    assert cfg.fusion.norm_eps == 1e-12 and cfg.decoder.act == "quick_gelu" and cfg.pooling == "first"
    vit = tiny_quickgelu_vision().vit
    assert all(isinstance(block.mlp.act, QuickGELU) for block in vit.blocks)
    assert isinstance(vit.norm_pre, nn.LayerNorm) and isinstance(vit.norm, nn.LayerNorm)
    assert vit.patch_embed.proj.bias is None and len(vit.blocks) == 2
    decoder = MIMDecoder(WIDTH, preset("base", {"decoder.width": 16, "decoder.heads": 2}).decoder, PATCH, WIDTH)
    assert isinstance(decoder.blocks[0].mlp.act, QuickGELU)
    # QuickGELU is x * sigmoid(1.702 x), not the exact GELU the earlier `base` tower used.
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(vit.blocks[0].mlp.act(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(vit.blocks[0].mlp.act(x), nn.functional.gelu(x), atol=1e-3)


def test_openai_torchscript_file_is_read_without_torch_jit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _OpenAIClip().half()
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.trace(model, torch.randn(2, 5, WIDTH).half()).save(str(path))
    expected = model.state_dict()

    def no_jit(*args, **kwargs):
        raise AssertionError("the TorchScript file must be read without torch.jit.load")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    state = read_torchscript_state_dict(path)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) and state[k].dtype == torch.float16 for k in expected)
    assert read_weights(path).keys() == expected.keys()
    # The file's third block is dropped: the reference's CLIP builds one block fewer than the file has.
    assert_openai_weights_loaded(tiny_quickgelu_vision(path), expected)


def test_open_clip_safetensors_and_timm_bin_files(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in _OpenAIClip().state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    assert_openai_weights_loaded(tiny_quickgelu_vision(tmp_path / "open_clip_model.safetensors"), state)

    source = timm.create_model(
        "vit_base_patch16_clip_quickgelu_224", img_size=IMAGE, embed_dim=WIDTH, depth=2, num_heads=2, num_classes=0
    )
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    tower = tiny_quickgelu_vision(tmp_path / "pytorch_model.bin")
    for key, value in source.state_dict().items():
        assert torch.equal(tower.vit.state_dict()[key], value), key


def test_hf_roberta_folder(tmp_path: Path) -> None:
    config = RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    source = RobertaModel(config, add_pooling_layer=False)
    source.save_pretrained(tmp_path / "roberta")
    tower = TextTower(TextConfig(name_or_path=str(tmp_path / "roberta"), pretrained=True))
    assert tower.encoder.pooler is None
    for key, value in source.state_dict().items():
        assert torch.equal(tower.encoder.state_dict()[key], value), key


def test_random_towers_warning_names_the_fix() -> None:
    base = preset("base")
    message = random_towers_warning("base", base)
    assert message is not None and "vision tower starts from random weights" in message
    assert "vision.pretrained_path" in message and "\n" not in message
    base.vision.pretrained_path = "ViT-B-16.pt"
    assert random_towers_warning("base", base) is None
    assert random_towers_warning("small", preset("small")) is None


@pytest.mark.slow
def test_a_base_run_with_random_towers_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    from umd_lightning.data import VQADataModule

    data = VQADataModule(
        dataset="vqa_rad", root=str(REPO / "tests" / "data" / "vqa_rad"), image_size=IMAGE, batch_size=4, scan="none"
    )
    overrides = {
        **TINY_VISION,
        "text.pretrained": False,
        "text.overrides": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "fusion.width": 32,
        "fusion.layers": 1,
        "fusion.heads": 2,
        "fusion.ffn": 64,
    }
    model = FineTune(preset="base", backbone_overrides=overrides, text_model="minilm", image_size=IMAGE)
    trainer = quiet_trainer(max_steps=1)
    with caplog.at_level(logging.WARNING, logger="umd_lightning"):
        trainer.fit(model, datamodule=data)
    warnings = [r.getMessage() for r in caplog.records if r.name == "umd_lightning" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "vision and text towers start from random weights" in warnings[0]
