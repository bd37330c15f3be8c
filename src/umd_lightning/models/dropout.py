"""Dropout whose masks are cheap to draw on a CPU, and attention that drops its weights with them.

PyTorch draws a CPU dropout mask with ``bernoulli_``, one generator call per element: about 7 ns an element on the
2-core AMD host the project is measured on, where a multiply costs 0.3 ns, so the masks of a ``small`` pre-training
step (10.6 M elements) take 8 % of it. Here one 64-bit draw of the same generator (``random_`` over the full int64
range) gives four independent uniform 16-bit integers, each compared with a threshold: about 1.2 ns an element (2.4
with two 32-bit integers a draw), the same seeding (``torch.manual_seed``, Lightning's ``seed_everything``, the
per-step seeds of ``data/sampler.py``) and the same mask distribution up to rounding ``p`` to a multiple of
``2**-16`` (0.1 is drawn as 0.100006; fused GPU attention kernels round it to 1/255). PyTorch's fused CPU attention
takes no dropout, so attention that drops its weights runs the unfused computation anyway (PyTorch's own math
kernel does); :func:`attention` runs it with these masks.

Only CPU tensors outside ``torch.compile`` take this path: GPU kernels draw dropout in the same kernel that
applies it (and fused attention supports it there), and Inductor fuses its own random draws.

Under CPU autocast (``bf16-mixed``) :func:`attention` also runs the fused kernel in fp32: PyTorch's fused CPU
attention is slower in bf16 than in fp32 at the sequence lengths of these models (forward and backward of a
(8, 3, 65, 64) attention: 2.7 ms in bf16, 0.9 ms in fp32 on the 2-core AMD host), and the upcast of ``q``, ``k``,
``v`` costs a small fraction of that. The result is cast back to the autocast dtype, so what follows is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

_LANE_BITS = 16
_LANES_PER_DRAW = 64 // _LANE_BITS
_LANE_LOW, _LANE_HIGH = -(2 ** (_LANE_BITS - 1)), 2 ** (_LANE_BITS - 1) - 1


def _lanes(shape: torch.Size | tuple[int, ...], device: torch.device | str) -> Tensor:
    """Uniform int16 draws of ``shape``: a quarter as many 64-bit draws of ``device``'s default generator."""
    count = 1
    for size in shape:
        count *= size
    words = torch.empty(-(-count // _LANES_PER_DRAW), dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # the full int64 range: all 64 bits uniform
    return words.view(torch.int16)[:count].view(shape)


def _threshold(p: float) -> int:
    """A lane below this is dropped: probability ``p`` rounded to a multiple of ``2**-16``. Where ``p`` is within
    ``2**-17`` of 1 it is one past the int16 range (every lane dropped): an int16 tensor refuses to be compared
    with it, so the callers check for that first."""
    return _LANE_LOW + round(p * 2**_LANE_BITS)


def _below(lanes: Tensor, threshold: int) -> Tensor:
    """``lanes < threshold`` for any ``threshold`` from :func:`_threshold`."""
    if threshold > _LANE_HIGH:  # p within 2**-17 of 1: every lane is dropped
        return torch.ones(lanes.shape, dtype=torch.bool, device=lanes.device)
    return lanes < threshold


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """A bool mask, True = dropped, each element independently with probability ``p`` (rounded to a multiple of
    ``2**-16``).

    Draws from the default generator of ``device``; a quarter as many 64-bit draws as elements. :func:`dropout`
    draws the same mask (for the same generator state) as a multiplier.
    """
    return _below(_lanes(shape, device), _threshold(p))


def keep_multiplier(
    shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Tensor:
    """:func:`drop_mask`'s mask as a multiplier in ``dtype``: 0 where dropped, 1 where kept; one comparison
    writes it."""
    keep = torch.empty(shape, dtype=dtype, device=device)
    lanes = _lanes(shape, device)
    threshold = _threshold(p)
    if threshold > _LANE_HIGH:  # every lane dropped
        return keep.zero_()
    return torch.ge(lanes, threshold, out=keep)


class _MaskedScale(torch.autograd.Function):
    """``x`` with the masked elements zeroed and the rest scaled; the backward pass does the same to the gradient
    (the mask is saved as bool, as PyTorch's dropout saves its own)."""

    @staticmethod
    def forward(ctx, x: Tensor, dropped: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return x.masked_fill(dropped, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (dropped,) = ctx.saved_tensors
        return grad.masked_fill(dropped, 0).mul_(ctx.scale), None, None


class _MultiplyScale(torch.autograd.Function):
    """``x * keep * scale``, and the same for the gradient (the 0 / 1 multiplier ``keep`` is saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


def _cpu_eager(x: Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _cpu_autocast_lowered() -> bool:
    """Whether CPU autocast is on with a dtype narrower than fp32 (``bf16-mixed``)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``, drawing the mask with :func:`drop_mask` on a CPU."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or not _cpu_eager(x):
        return F.dropout(x, p, training)
    scale = 1.0 / (1.0 - p)
    if x.element_size() == 2:
        # bf16 / fp16 (under bf16-mixed): a multiply by a 0 / 1 multiplier of x's dtype is several times cheaper
        # than masked_fill with a bool mask, whose CPU kernel is not vectorised (0.5 ns an element against 0.06
        # on the 2-core AMD host), at twice the bool's memory. The scale stays a separate fp32 scalar: in bf16
        # it would be rounded (1 / 0.9 -> 1.109).
        return _MultiplyScale.apply(x, keep_multiplier(x.shape, p, x.dtype, x.device), scale)
    # fp32: a 4-byte multiplier made the whole step slower (460 against 438 ms at `small`: more memory, more
    # page faults on fresh allocations), so the bool mask stays.
    return _MaskedScale.apply(x, drop_mask(x.shape, p, x.device), scale)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same ``p``) whose masks come from :func:`drop_mask` on a CPU."""

    def forward(self, input: Tensor) -> Tensor:
        if self.inplace:
            return F.dropout(input, self.p, self.training, inplace=True)
        return dropout(input, self.p, self.training)


def use_cheap_dropout(module: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` inside ``module`` by :class:`Dropout` with the same ``p``.

    No parameters or buffers change, so state dicts and checkpoints are unaffected. Returns how many were replaced.
    """
    replaced = 0
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
                replaced += 1
    return replaced


def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None
) -> Tensor:
    """``F.scaled_dot_product_attention`` (not causal), its attention weights dropped with :func:`dropout`.

    Args:
        q: (B, H, Lq, E). k: (B, H, Lk, E). v: (B, H, Lk, Ev).
        attn_mask: broadcastable to (B, H, Lq, Lk): bool (True = attend) or additive float.
        dropout_p: dropout on the attention weights (0 in evaluation).
        scale: the scores' factor; default ``E ** -0.5``.

    Returns:
        (B, H, Lq, Ev).
    """
    if dropout_p == 0.0 and _cpu_eager(q) and _cpu_autocast_lowered():
        with torch.autocast("cpu", enabled=False):
            mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
        return out.to(torch.get_autocast_dtype("cpu"))
    if dropout_p == 0.0 or not _cpu_eager(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    factor = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * factor) @ k.transpose(-2, -1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    return dropout(scores.softmax(-1), dropout_p) @ v


TEXT_ATTENTION = "umd_sdpa"
"""The name under which :func:`text_attention` is registered with ``transformers``' attention interface."""


def text_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """``transformers``' SDPA attention, except that a bidirectional encoder's attention on a CPU goes through
    :func:`attention` when it drops attention weights or runs under ``bf16-mixed``; anything else (fp32
    evaluation, a GPU, causal or biased or grouped attention) is handed to ``transformers``' own SDPA function
    unchanged."""
    plain = (
        not getattr(module, "is_causal", False)
        and kwargs.get("is_causal") in (None, False)
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and getattr(module, "num_key_value_groups", 1) == 1
    )
    if not plain or not _cpu_eager(query) or (dropout == 0.0 and not _cpu_autocast_lowered()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = attention(query, key, value, attention_mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


# Registered on import, not when a model is switched: a model unpickled in another process (a spawned worker, a
# pickled checkpoint object) names this implementation in its config, and transformers refuses unknown names.
AttentionInterface.register(TEXT_ATTENTION, text_attention)
AttentionMaskInterface.register(TEXT_ATTENTION, sdpa_mask)


def use_cheap_text_attention(encoder: nn.Module) -> bool:
    """Switch a ``transformers`` model that uses SDPA attention to :func:`text_attention` (with SDPA's mask
    function). Models that do not use the attention interface are left as they are.

    Returns:
        Whether the model was switched.
    """
    config = getattr(encoder, "config", None)
    if config is None or config._attn_implementation != "sdpa" or not encoder._can_set_attn_implementation():
        return False
    encoder.set_attn_implementation(TEXT_ATTENTION)
    return True
