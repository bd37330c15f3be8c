"""The backbone's parts (vision and text towers, fusion, backbone) and the heads, on the tiny preset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from umd_lightning.models import (
    MINILM,
    BackboneConfig,
    ClassifierHead,
    CoAttentionLayer,
    FeaturePredictor,
    FusionEncoder,
    ITMHead,
    MIMDecoder,
    MLMHead,
    RetrievalHead,
    TextConfig,
    TextTower,
    UMDBackbone,
    VisionTower,
    load_tokenizer,
    preset,
    random_masking,
    resolve_text_model,
    sincos_pos_embed_2d,
)
from umd_lightning.weights import UntrustedPickleError


@pytest.fixture(scope="module")
def tiny() -> BackboneConfig:
    return preset("tiny")


@pytest.fixture(scope="module")
def tower(tiny: BackboneConfig) -> VisionTower:
    torch.manual_seed(0)
    return VisionTower(tiny.vision, tiny.image_size).eval()


@pytest.fixture(scope="module")
def backbone(tiny: BackboneConfig) -> UMDBackbone:
    torch.manual_seed(0)
    return UMDBackbone(tiny).eval()


def encode_by_hand(tower: VisionTower, images: Tensor, keep: Tensor) -> Tensor:
    """The kept patches through timm's own layers, at the tower's native size (no position resampling)."""
    vit = tower.vit
    patches = vit.patch_embed.proj(images).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    kept = torch.stack([patches[i, keep[i]] for i in range(len(keep))])
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(len(keep), -1, -1)
    tokens = vit.norm_pre(torch.cat([cls, kept], dim=1))
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens)


# ---------------------------------------------------------------- vision tower


def test_vision_tower_sizes(tower: VisionTower) -> None:
    assert tower.width == 32 and tower.patch_size == 8
    assert tower.grid_size(32) == (4, 4) and tower.grid_size((48, 64)) == (6, 8)
    with pytest.raises(ValueError, match="multiple"):
        tower.grid_size(30)


@torch.no_grad()
def test_all_patches_in_order_equal_no_keep_indices(tower: VisionTower) -> None:
    images = torch.randn(2, 3, 32, 32)
    every = torch.arange(16).expand(2, -1)
    assert torch.allclose(tower(images, every), tower(images), atol=1e-5)


@torch.no_grad()
def test_kept_subset_equals_timm_blocks_on_gathered_tokens(tower: VisionTower) -> None:
    images = torch.randn(3, 3, 32, 32)
    keep, mask = random_masking(3, 16, 0.75, "cpu", generator=torch.Generator().manual_seed(1))
    out = tower(images, keep)
    assert out.shape == (3, 1 + 4, 32)
    assert torch.allclose(out, encode_by_hand(tower, images, keep), atol=1e-5)
    # Masked patches leak nothing: rewriting their pixels leaves the output unchanged.
    pixel_mask = mask.view(3, 1, 4, 1, 4, 1).expand(3, 3, 4, 8, 4, 8).reshape(3, 3, 32, 32)
    altered = torch.where(pixel_mask, torch.randn_like(images) * 10, images)
    assert torch.allclose(tower(altered, keep), out, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
@pytest.mark.parametrize(
    "arch",
    [
        "vit_tiny_patch16_224",
        "vit_base_patch16_clip_224",  # has norm_pre
        "deit3_small_patch16_224",  # position embeddings without a class-token entry
    ],
)
def test_full_pass_matches_timm_at_two_image_sizes(tiny: BackboneConfig, arch: str, size: tuple[int, int]) -> None:
    tower = VisionTower(dataclasses.replace(tiny.vision, arch=arch), tiny.image_size).eval()
    images = torch.randn(2, 3, *size)
    out = tower(images)
    h, w = tower.grid_size(size)
    assert out.shape == (2, 1 + h * w, 32)
    # timm's dynamic-size forward resamples the position embeddings the same way.
    assert torch.allclose(out, tower.vit.forward_features(images), atol=1e-5)


@torch.no_grad()
def test_masked_pass_runs_blocks_on_kept_tokens_only(tower: VisionTower) -> None:
    seen: list[int] = []
    handle = tower.vit.blocks[0].register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    keep, _ = random_masking(2, 48, 0.75, "cpu")
    tower(torch.randn(2, 3, 48, 64), keep)
    tower(torch.randn(2, 3, 48, 64))
    handle.remove()
    assert seen == [1 + 12, 1 + 48]


class NotATensor:
    """A custom object: unpickling it would need arbitrary code, which weights-only loading refuses."""


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_loads_at_another_image_size(tiny: BackboneConfig, tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(2)
    source = VisionTower(tiny.vision, 32)
    state = {k: v.clone() for k, v in source.vit.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 32)  # a classifier the tower does not have
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    loaded = VisionTower(dataclasses.replace(tiny.vision, pretrained_path=str(path)), image_size=48)
    assert torch.equal(loaded.vit.patch_embed.proj.weight, source.vit.patch_embed.proj.weight)
    assert torch.equal(loaded.vit.blocks[1].mlp.fc2.weight, source.vit.blocks[1].mlp.fc2.weight)
    assert loaded.vit.pos_embed.shape == (1, 1 + 36, 32)
    resampled = resample_abs_pos_embed(source.vit.pos_embed, new_size=[6, 6], num_prefix_tokens=1)
    assert torch.allclose(loaded.vit.pos_embed, resampled, atol=1e-6)


def test_checkpoint_needing_pickle_is_refused(tiny: BackboneConfig, tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"model": VisionTower(tiny.vision, 32).vit.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(UntrustedPickleError, match="UMD_TRUST_PICKLE=1"):
        VisionTower(dataclasses.replace(tiny.vision, pretrained_path=str(path)), image_size=32)


def test_missing_checkpoint_is_reported(tiny: BackboneConfig, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        VisionTower(dataclasses.replace(tiny.vision, pretrained_path=str(tmp_path / "none.pth")), image_size=32)


# ---------------------------------------------------------------- text tower


def test_tiny_random_text_tower(tiny: BackboneConfig) -> None:
    text = TextTower(tiny.text)
    assert text.width == 32 and text.vocab_size == 30522
    assert getattr(text.encoder, "pooler", None) is None  # no parameters without gradient under DDP
    out = text(torch.randint(0, 1000, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    assert out.shape == (2, 5, 32)


def test_real_minilm_loads_offline_with_its_weights() -> None:
    text = TextTower(TextConfig(name_or_path=MINILM, pretrained=True)).eval()
    assert text.width == 384 and text.vocab_size == 30522
    stored = load_file(str(Path(resolve_text_model(MINILM)) / "model.safetensors"))
    assert torch.equal(text.encoder.embeddings.word_embeddings.weight, stored["embeddings.word_embeddings.weight"])
    tokenizer = load_tokenizer(MINILM)
    assert tokenizer.is_fast
    batch = tokenizer(["a chest x-ray", "no acute findings in the lungs"], padding=True, return_tensors="pt")
    assert batch.word_ids(0) is not None
    with torch.no_grad():
        out = text(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, batch["input_ids"].shape[1], 384) and torch.isfinite(out).all()


def test_text_tower_round_trips_through_a_local_folder(tiny: BackboneConfig, tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = TextTower(tiny.text).eval()
    source.encoder.save_pretrained(tmp_path)
    load_tokenizer(MINILM).save_pretrained(tmp_path)
    loaded = TextTower(TextConfig(name_or_path=str(tmp_path), pretrained=True)).eval()
    assert loaded.width == 32
    ids, mask = torch.randint(0, 1000, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), source(ids, mask), atol=1e-6)
    assert load_tokenizer(str(tmp_path)).vocab_size == 30522


# ---------------------------------------------------------------- fusion


@pytest.mark.parametrize("prenorm", [False, True])
@torch.no_grad()
def test_fusion_ignores_padded_text_positions(tiny: BackboneConfig, prenorm: bool) -> None:
    torch.manual_seed(4)
    fusion = FusionEncoder(dataclasses.replace(tiny.fusion, prenorm=prenorm)).eval()
    text, image = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    text_mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    text_out, image_out = fusion(text, image, text_mask)
    altered = text.clone()
    altered[0, 4:] = torch.randn(2, 32) * 5
    text_alt, image_alt = fusion(altered, image, text_mask)
    assert len(text_out) == len(image_out) == tiny.fusion.layers
    for layer in range(tiny.fusion.layers):
        assert torch.allclose(text_alt[layer][0, :4], text_out[layer][0, :4], atol=1e-5)
        assert torch.allclose(text_alt[layer][1], text_out[layer][1], atol=1e-5)
        assert torch.allclose(image_alt[layer], image_out[layer], atol=1e-5)
    assert not torch.allclose(text_alt[0][0, 4:], text_out[0][0, 4:])  # the padded rows themselves did change


@torch.no_grad()
def test_fusion_streams_read_the_other_streams_layer_input(tiny: BackboneConfig) -> None:
    torch.manual_seed(5)
    fusion = FusionEncoder(tiny.fusion).eval()
    text, image = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    text_mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    text_out, image_out = fusion(text, image, text_mask)
    t, v = text, image
    for layer in range(tiny.fusion.layers):
        t, v = (
            fusion.text_layers[layer](t, v, text_mask, None),
            fusion.image_layers[layer](v, t, None, text_mask),
        )
        assert torch.allclose(text_out[layer], t, atol=1e-6)
        assert torch.allclose(image_out[layer], v, atol=1e-6)
    # A sequential update (image reading the already-updated text) would give another result.
    sequential = fusion.image_layers[0](image, text_out[0], None, text_mask)
    assert not torch.allclose(sequential, image_out[0], atol=1e-3)


@torch.no_grad()
def test_post_norm_outputs_are_normalised_and_pre_norm_are_not(tiny: BackboneConfig) -> None:
    torch.manual_seed(6)
    x, other = torch.randn(2, 6, 32) * 3 + 1, torch.randn(2, 5, 32)
    post = CoAttentionLayer(tiny.fusion).eval()(x, other)
    pre = CoAttentionLayer(dataclasses.replace(tiny.fusion, prenorm=True)).eval()(x, other)
    assert torch.allclose(post.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(post.var(-1, unbiased=False), torch.ones(2, 6), atol=1e-3)
    assert pre.var(-1, unbiased=False).mean() > 2  # the residual stream keeps the input's scale


# ---------------------------------------------------------------- backbone


def test_backbone_shapes_and_pooling(backbone: UMDBackbone) -> None:
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 1000, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    keep, _ = random_masking(2, 16, 0.75, "cpu")
    with torch.no_grad():
        out = backbone(images, ids, mask, keep)
        full = backbone(images, ids, mask)
    assert backbone.width == 32
    assert [t.shape for t in out.text_layers] == [(2, 7, 32)] * 2
    assert [t.shape for t in out.image_layers] == [(2, 5, 32)] * 2
    assert full.image_feats.shape == (2, 17, 32)
    assert out.text_feats is out.text_layers[-1] and out.image_feats is out.image_layers[-1]
    assert out.pooled.shape == (2, 64)
    assert torch.equal(out.pooled[:, :32], out.text_pooled) and torch.equal(out.pooled[:, 32:], out.image_pooled)
    expected = torch.tanh(backbone.image_pooler.linear(out.image_feats[:, 0]))
    assert torch.allclose(out.image_pooled, expected)


def test_backbone_parameter_partition(backbone: UMDBackbone) -> None:
    def ids(modules: list[nn.Module]) -> set[int]:
        return {id(p) for m in modules for p in m.parameters()}

    text, image = ids(backbone.text_side()), ids(backbone.image_side())
    shared = ids([backbone.type_embed, backbone.text_pooler, backbone.image_pooler])
    every = {id(p) for p in backbone.parameters()}
    assert text and image and shared
    assert not (text & image) and not (text & shared) and not (image & shared)
    assert text | image | shared == every
    towers = ids(backbone.tower_modules())
    assert towers == ids([backbone.vision, backbone.text]) and towers < text | image


# ---------------------------------------------------------------- heads


def test_sincos_pos_embed_known_values() -> None:
    pos = sincos_pos_embed_2d(8, (2, 3))
    assert pos.shape == (6, 8)
    assert torch.equal(pos[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # (row 1, col 2): row half uses pos 1, column half pos 2, omega = (1, 1/100).
    row, col = torch.tensor([1.0, 0.01]), torch.tensor([2.0, 0.02])
    assert torch.allclose(pos[5], torch.cat([row.sin(), row.cos(), col.sin(), col.cos()]))


def test_insert_mask_tokens_places_kept_tokens_at_their_indices(tiny: BackboneConfig) -> None:
    decoder = MIMDecoder(32, tiny.decoder, 8, 32)
    embedded = torch.arange(2 * 3 * 32, dtype=torch.float32).reshape(2, 3, 32)
    keep = torch.tensor([[1, 3], [0, 2]])
    out = decoder.insert_mask_tokens(embedded, keep, num_patches=4)
    assert out.shape == (2, 5, 32)
    token = decoder.mask_token[0, 0]
    assert torch.equal(out[:, 0], embedded[:, 0])  # class token first
    assert torch.equal(out[0, 2], embedded[0, 1]) and torch.equal(out[0, 4], embedded[0, 2])
    assert torch.equal(out[0, 1], token) and torch.equal(out[0, 3], token)
    assert torch.equal(out[1, 1], embedded[1, 1]) and torch.equal(out[1, 3], embedded[1, 2])
    assert torch.equal(out[1, 2], token) and torch.equal(out[1, 4], token)


def test_mim_decoder_outputs_and_gradients(tiny: BackboneConfig) -> None:
    decoder = MIMDecoder(32, tiny.decoder, patch_size=8, feature_dim=24)
    keep, _ = random_masking(2, 24, 0.75, "cpu")
    tokens = torch.randn(2, 1 + 6, 32, requires_grad=True)
    pixels, features = decoder(tokens, keep, (4, 6))
    assert pixels.shape == (2, 24, 8 * 8 * 3) and features.shape == (2, 24, 24)
    (pixels.sum() + features.sum()).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert decoder.mask_token.grad is not None and decoder.mask_token.grad.abs().sum() > 0


def test_small_heads_shapes_and_init() -> None:
    features = torch.randn(2, 7, 32)
    assert MLMHead(32, 100)(features).shape == (2, 7, 100)
    assert FeaturePredictor(32)(features).shape == (2, 7, 32)
    pooled = torch.randn(4, 64)
    assert ITMHead(64)(pooled).shape == (4, 2)
    classifier = ClassifierHead(64, 5)
    assert classifier(pooled).shape == (4, 5)
    assert classifier.final.weight.shape == (5, 64)
    assert torch.equal(classifier.final.bias, torch.zeros(5))
    assert classifier.final.weight.abs().max() <= 0.04 + 1e-6  # trunc normal(0.02) is cut at 2 std


def test_retrieval_head_starts_from_itm_positive_row() -> None:
    itm = ITMHead(64)
    nn.init.normal_(itm.linear.bias)
    retrieval = RetrievalHead(64)
    retrieval.init_from_itm(itm)
    assert torch.equal(retrieval.linear.weight[0], itm.linear.weight[1])
    assert torch.equal(retrieval.linear.bias[0], itm.linear.bias[1])
    pooled = torch.randn(3, 16, 64)
    with torch.no_grad():
        assert torch.allclose(retrieval(pooled), itm(pooled)[..., 1])
