"""Where the model looked: per-patch relevance maps for a VQA / classification answer, and their overlays.

Two methods, both computed for the chosen answer (or any output index) of a ``UMDBackbone`` + classifier head:

``rollout``
    Attention rollout through the co-attention fusion (the attention-only rules of Chefer et al., ICCV 2021,
    "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"): four
    relevance matrices ``R_tt, R_ti, R_it, R_ii`` start as ``I, 0, 0, I``; every self-attention ``A`` of a stream
    adds ``A @ R_s*`` to that stream's rows, every text-to-image cross-attention adds ``A_ti @ R_i*`` to the text
    rows (and image-to-text ``A_it @ R_t*`` to the image rows), both streams updated from the other's *input* to
    the layer, as the fusion does. The map is the pooled tokens' relevance to the image patches: the text first
    token's row of ``R_ti`` plus the image class token's row of ``R_ii`` (the two vectors the head reads; rows
    averaged over all tokens when the backbone pools by mean). Heads are averaged.
``gradcam``
    Grad-CAM on the image stream entering the last fusion layer (the tokens the last text layer cross-attends to
    and the image class token pools): channel weights are the answer logit's gradient averaged over the patches,
    the map is ``relu(sum_c w_c * a_c)`` per patch. Captum's ``LayerGradCam`` assumes a channels-first
    convolutional layout (it averages gradients over the dimensions after the channel one), which token streams
    ``(B, N, D)`` do not have, so these few lines do the same computation on tokens directly.

Maps are ``(h, w)`` float arrays over the patch grid, scaled to [0, 1]. :func:`explain` returns an
:class:`Explanation` (answer, top-5, maps, and the image as the model saw it); :meth:`Explanation.save` writes
``<stem>_<method>.png`` (the map over the image) and ``<stem>_<method>.npy`` (the raw grid).
``umd predict --explain`` (:class:`ExplanationWriter`) writes them for every predicted sample beside the JSONL.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

from umd_lightning.models.fusion import MultiHeadAttention

METHODS = ("rollout", "gradcam")
TOP_K = 5


# ----------------------------------------------------------------------------------------------- attention capture
def attention_weights(module: MultiHeadAttention, queries: Tensor, keys: Tensor, key_mask: Tensor | None) -> Tensor:
    """The softmax weights ``(B, heads, Lq, Lk)`` that ``module`` applies (``scaled_dot_product_attention`` does
    not return them), recomputed from its query / key projections and the key padding mask."""
    q = module._split(module.query(queries))
    k = module._split(module.key(keys))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return scores.softmax(-1)


@contextlib.contextmanager
def record_attention(backbone: nn.Module) -> Iterator[list[dict[str, Tensor]]]:
    """Record, while active, every fusion layer's head-averaged attention weights.

    Yields a list filled during the forward pass, one dict per layer (first layer first) with ``text_self``
    (B, Lt, Lt), ``text_cross`` (B, Lt, Li), ``image_self`` (B, Li, Li) and ``image_cross`` (B, Li, Lt).
    """
    fusion = backbone.fusion
    layers: list[dict[str, Tensor]] = [{} for _ in fusion.text_layers]
    handles = []

    def hook(index: int, name: str):
        def store(module: MultiHeadAttention, args: tuple, output: Tensor) -> None:
            queries, keys = args[0], args[1]
            key_mask = args[2] if len(args) > 2 else None
            with torch.no_grad():
                layers[index][name] = attention_weights(module, queries, keys, key_mask).mean(1).float()

        return store

    for i, (text_layer, image_layer) in enumerate(zip(fusion.text_layers, fusion.image_layers, strict=True)):
        handles += [
            text_layer.self_attn.register_forward_hook(hook(i, "text_self")),
            text_layer.cross_attn.register_forward_hook(hook(i, "text_cross")),
            image_layer.self_attn.register_forward_hook(hook(i, "image_self")),
            image_layer.cross_attn.register_forward_hook(hook(i, "image_cross")),
        ]
    try:
        yield layers
    finally:
        for handle in handles:
            handle.remove()


def co_attention_rollout(layers: Sequence[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Roll attention out through the co-attention layers (rules in the module docstring).

    Args:
        layers: per layer ``text_self``, ``text_cross``, ``image_self``, ``image_cross`` (head-averaged, batched).

    Returns:
        ``R_ti`` (B, Lt, Li): each text token's relevance to each image token, and ``R_ii`` (B, Li, Li).
    """
    first = layers[0]
    batch, lt, li = first["text_cross"].shape
    eye_t = torch.eye(lt).expand(batch, lt, lt)
    eye_i = torch.eye(li).expand(batch, li, li)
    r_tt, r_ti, r_it, r_ii = eye_t.clone(), torch.zeros(batch, lt, li), torch.zeros(batch, li, lt), eye_i.clone()
    for layer in layers:
        a_ts, a_tc, a_is, a_ic = (layer[k].float() for k in ("text_self", "text_cross", "image_self", "image_cross"))
        # text stream: self-attention, then cross-attention to the image stream's input to this layer
        n_tt, n_ti = r_tt + a_ts @ r_tt, r_ti + a_ts @ r_ti
        n_tt, n_ti = n_tt + a_tc @ r_it, n_ti + a_tc @ r_ii
        # image stream, in parallel: self-attention, then cross-attention to the text stream's input
        n_it, n_ii = r_it + a_is @ r_it, r_ii + a_is @ r_ii
        n_it, n_ii = n_it + a_ic @ r_tt, n_ii + a_ic @ r_ti
        r_tt, r_ti, r_it, r_ii = n_tt, n_ti, n_it, n_ii
    return r_ti, r_ii


def rollout_map(layers: Sequence[dict[str, Tensor]], pooling: str = "first") -> Tensor:
    """Per-patch relevance (B, N) of the pooled tokens: text first token's ``R_ti`` row + image class token's
    ``R_ii`` row (their means over tokens for ``pooling="mean"``), class token column dropped."""
    r_ti, r_ii = co_attention_rollout(layers)
    if pooling == "mean":
        return r_ti.mean(1)[:, 1:] + r_ii.mean(1)[:, 1:]
    return r_ti[:, 0, 1:] + r_ii[:, 0, 1:]


# ----------------------------------------------------------------------------------------------- the maps
def _logits(backbone: nn.Module, head: nn.Module, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    return head(backbone(pixels, ids, mask).pooled)


def gradcam_map(
    backbone: nn.Module, head: nn.Module, pixels: Tensor, ids: Tensor, mask: Tensor, target: Tensor
) -> Tensor:
    """Grad-CAM (B, N) of the logits ``target`` (B,) on the image stream entering the last fusion layer."""
    captured: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: tuple) -> None:
        captured["tokens"] = args[0]

    handle = backbone.fusion.image_layers[-1].register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            logits = _logits(backbone, head, pixels, ids, mask)
            chosen = logits.gather(1, target[:, None]).sum()
            # the tokens' gradient only: the parameters' .grad (a training run's accumulated gradients) and
            # their hooks (GM-Coord's) are left untouched
            (grads,) = torch.autograd.grad(chosen, captured["tokens"])
    finally:
        handle.remove()
    patches, grads = captured["tokens"][:, 1:].detach(), grads[:, 1:]
    weights = grads.mean(dim=1, keepdim=True)  # (B, 1, D): the patch average, as Grad-CAM's spatial average
    return torch.relu((patches * weights).sum(-1)).float()


def normalise(values: Tensor) -> Tensor:
    """Scale each row of (B, N) to [0, 1] (a constant row becomes zeros)."""
    low = values.min(dim=-1, keepdim=True).values
    span = values.max(dim=-1, keepdim=True).values - low
    return torch.where(span > 0, (values - low) / span.clamp_min(1e-12), torch.zeros_like(values))


def patch_maps(
    backbone: nn.Module,
    head: nn.Module,
    pixels: Tensor,
    ids: Tensor,
    mask: Tensor,
    target: Tensor | None = None,
    methods: Sequence[str] = METHODS,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and per-method maps for a batch.

    Args:
        backbone: a ``UMDBackbone`` (in eval mode).
        head: maps the joint pooled vector to logits.
        pixels: (B, 3, H, W) normalised images.
        ids: (B, L) token ids; mask: (B, L) attention mask.
        target: (B,) output index to explain; ``None``: the top logit.
        methods: some of :data:`METHODS`.

    Returns:
        logits (B, |A|) and ``{method: (B, h, w) maps in [0, 1]}`` over the patch grid.

    Raises:
        ValueError: an unknown method.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown explanation method(s) {unknown}: choose from {', '.join(METHODS)}")
    grid = backbone.vision.grid_size((pixels.shape[-2], pixels.shape[-1]))
    with torch.no_grad(), record_attention(backbone) as layers:
        logits = _logits(backbone, head, pixels, ids, mask).float()
    if target is None:
        target = logits.argmax(-1)
    maps: dict[str, Tensor] = {}
    if "rollout" in methods:
        maps["rollout"] = rollout_map(layers, backbone.cfg.pooling)
    if "gradcam" in methods:
        maps["gradcam"] = gradcam_map(backbone, head, pixels, ids, mask, target)
    return logits, {name: normalise(m.cpu()).view(-1, *grid) for name, m in maps.items()}


# ----------------------------------------------------------------------------------------------- one answer
@dataclass
class Explanation:
    """One explained answer.

    Attributes:
        question: the question / text.
        answer: the chosen answer (or class).
        top: the ``top_k`` answers with their probabilities.
        maps: ``{method: (h, w) float32 array in [0, 1]}`` over the patch grid.
        image: the image as the model saw it (resized, cropped), (H, W, 3) uint8.
    """

    question: str
    answer: str
    top: list[tuple[str, float]]
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    image: np.ndarray | None = None

    def overlay(self, method: str) -> Image.Image:
        """The map of ``method`` over the image (a heat colour blended in where the map is high)."""
        return overlay(self.image, self.maps[method])

    def save(self, folder: str | Path, stem: str) -> list[Path]:
        """Write ``<stem>_<method>.png`` (overlay) and ``<stem>_<method>.npy`` (the grid) per method."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for method, grid in self.maps.items():
            png, npy = folder / f"{stem}_{method}.png", folder / f"{stem}_{method}.npy"
            self.overlay(method).save(png)
            np.save(npy, grid)
            written += [png, npy]
        return written

    def as_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "top5": [[a, round(p, 6)] for a, p in self.top]}


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A blue -> green -> yellow -> red ramp for values in [0, 1]: (..., 3) uint8."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 255], [0, 200, 0], [255, 230, 0], [230, 0, 0]], dtype=np.float64)
    position = v * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = position - low
    colours = stops[low[..., 0]] * (1 - frac) + stops[low[..., 0] + 1] * frac
    return colours.round().astype(np.uint8)


def overlay(image: np.ndarray, grid: np.ndarray, strength: float = 0.55) -> Image.Image:
    """Blend the heat colours of ``grid`` (h, w), upsampled bilinearly to the image, over ``image`` (H, W, 3):
    each pixel mixes in up to ``strength`` of the colour, in proportion to its value."""
    height, width = image.shape[:2]
    up = Image.fromarray(grid.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
    values = np.clip(np.asarray(up, dtype=np.float64), 0.0, 1.0)
    alpha = strength * values[..., None]
    blended = image.astype(np.float64) * (1 - alpha) + heat_colours(values).astype(np.float64) * alpha
    return Image.fromarray(blended.round().astype(np.uint8), mode="RGB")


def model_view(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation of one (3, H, W) image: (H, W, 3) uint8."""
    restored = pixels.detach().cpu().float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (restored.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def explain(
    model: Any,
    image: str | Path | Image.Image,
    question: str,
    methods: Sequence[str] = METHODS,
    top_k: int = TOP_K,
    max_length: int | None = None,
) -> Explanation:
    """Answer ``question`` about ``image`` with an inference model and explain the chosen answer.

    Args:
        model: a :class:`~umd_lightning.hub.UMDInferenceModel` (backbone, head, tokenizer, transform, labels).
        image: an image file or a PIL image.
        question: the question (VQA) or text (classification).
        methods: some of :data:`METHODS`.
        top_k: answers listed with their probabilities.
        max_length: tokens kept; ``None``: the model's.

    Raises:
        ValueError: an empty question or an unknown method.
        DataError: the image file is missing or does not decode.
    """
    from umd_lightning.data.common import is_visible, load_image

    if not isinstance(question, str) or not is_visible(question):
        raise ValueError(f"the question/text is empty ({question!r}): give the question to answer")
    picture = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)
    device = next(model.parameters()).device
    pixels = model.transform(picture).unsqueeze(0).to(device)
    tokens = model.tokenizer(
        [question], truncation=True, max_length=max_length or model.max_text_length, return_tensors="pt"
    )
    was_training = model.training
    model.eval()
    try:
        logits, maps = patch_maps(
            model.backbone,
            model.head,
            pixels,
            tokens["input_ids"].to(device),
            tokens["attention_mask"].to(device),
            methods=methods,
        )
    finally:
        model.train(was_training)
    probabilities = logits[0].sigmoid() if model.task == "vqa" else logits[0].softmax(-1)
    top = probabilities.topk(min(top_k, probabilities.shape[-1]))
    pairs = [(model.labels[j], float(p)) for p, j in zip(top.values, top.indices)]
    norm = next(t for t in model.transform.transforms if isinstance(t, v2.Normalize))
    return Explanation(
        question=question,
        answer=pairs[0][0],
        top=pairs,
        maps={name: grid[0].numpy().astype(np.float32) for name, grid in maps.items()},
        image=model_view(pixels[0], norm.mean, norm.std),
    )


# ----------------------------------------------------------------------------------------------- umd predict
class ExplanationWriter(Callback):
    """``umd predict --explain``: for every VQA / classification sample, the overlay PNG and the map array of each
    method, ``<id>_<method>.png`` / ``.npy`` in ``<predictions file stem>_explanations/`` beside the JSONL.

    Args:
        folder: where to write instead; ``None``: beside the predictions file.
        methods: some of :data:`METHODS`.
    """

    def __init__(self, folder: str | None = None, methods: Sequence[str] = METHODS) -> None:
        self.folder = Path(folder) if folder else None
        self.methods = tuple(methods)
        self.written = 0

    def _default_folder(self, trainer: Any) -> Path:
        output = next((c.output for c in trainer.callbacks if getattr(c, "output", None)), None)
        jsonl = Path(output) if output else Path(trainer.log_dir or ".") / "predictions.jsonl"
        return jsonl.with_name(f"{jsonl.stem}_explanations")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        if pl_module.hparams.get("task") not in ("vqa", "classification"):
            raise ValueError("--explain explains VQA answers and classes; a retrieval model has no answer to explain")
        self.folder = self.folder or self._default_folder(trainer)
        self.written = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        ids = batch.get("qids", batch.get("ids"))
        with torch.inference_mode(False):
            pixels = batch["pixel_values"].clone()
            _, maps = patch_maps(
                pl_module.backbone,
                pl_module.head,
                pixels,
                batch["input_ids"].clone(),
                batch["attention_mask"].clone(),
                methods=self.methods,
            )
        mean, std = _normalisation(trainer.datamodule)
        for i, row in enumerate(outputs or []):
            explanation = Explanation(
                question=str(row.get("question", "")),
                answer=str(row.get("answer", row.get("label", ""))),
                top=[],
                maps={name: grid[i].numpy().astype(np.float32) for name, grid in maps.items()},
                image=model_view(pixels[i], mean, std),
            )
            explanation.save(self.folder, _safe_stem(ids[i] if ids is not None else f"{batch_idx}_{i}"))
            self.written += 1

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        print(f"explanations ({', '.join(self.methods)}) of {self.written} samples written to {self.folder}")


def _normalisation(datamodule: Any) -> tuple[Sequence[float], Sequence[float]]:
    from umd_lightning.data.transforms import CLIP_MEAN, CLIP_STD

    return getattr(datamodule, "image_mean", CLIP_MEAN), getattr(datamodule, "image_std", CLIP_STD)


def _safe_stem(value: Any) -> str:
    """A file name from a sample id: letters, digits, ``-``, ``_`` and ``.`` kept, the rest ``_``."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(value)).lstrip(".") or "sample"
