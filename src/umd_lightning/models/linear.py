"""``nn.Linear`` whose CPU fp32 matrix products run on oneDNN instead of MKL.

PyTorch computes a CPU fp32 ``linear`` (and its two backward products) with MKL's ``sgemm``. On AMD CPUs MKL
takes its AVX2 code path even where the CPU has AVX-512: on the 2-core AMD EPYC host the project is measured on,
``sgemm`` reaches 210-235 GFLOP/s on the shapes of these models, while oneDNN's fp32 matmul (the library PyTorch
already runs bf16 matmuls and convolutions on, and Inductor calls for CPU linears) reaches 430-510 GFLOP/s on the
same shapes, forward, input-gradient and weight-gradient products alike. Both are plain fp32 products (no reduced
precision); they differ only in rounding, by summing in another order.

:class:`Linear` is ``nn.Linear`` with no state of its own (same parameters, same state-dict keys), whose forward
takes oneDNN for CPU fp32 tensors outside autocast and ``torch.compile``, and ``F.linear`` for everything else
(GPUs, ``bf16-mixed``, other dtypes, empty inputs). ``UMD_CPU_MATMUL=aten`` in the environment turns it off.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
    else None
)

if _ONEDNN_LINEAR is not None:

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        """2 M K N, as for ``aten.mm``, so that ``FlopCounterMode`` counts these products too."""
        rows = 1
        for size in x_shape[:-1]:
            rows *= size
        return 2 * rows * x_shape[-1] * weight_shape[0]


CPU_MATMUL = os.environ.get("UMD_CPU_MATMUL", "onednn")
"""``onednn`` (default): CPU fp32 linears on oneDNN where PyTorch has it (x86-64); ``aten``: PyTorch's own."""
if CPU_MATMUL not in ("onednn", "aten"):
    raise ValueError(f"UMD_CPU_MATMUL={CPU_MATMUL!r} in the environment: set it to onednn or aten, or unset it")


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(M, K) x (N, K)^T (+ bias) -> (M, N) on oneDNN. The weight may be a transposed view; a non-contiguous
    ``x`` (the weight gradient's ``grad.t()``) is first copied by the op, which still beats MKL's product."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(flat, weight)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        return _product(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        flat, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t(), None).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _product(grad.t(), flat.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def takes_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` computes ``x @ weight.T`` on oneDNN."""
    return (
        _ONEDNN_LINEAR is not None
        and CPU_MATMUL == "onednn"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.layout == torch.strided
        and weight.layout == torch.strided
        and weight.dim() == 2
        and x.dim() >= 1
        and x.numel() > 0
        and weight.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN where :func:`takes_onednn` says so.

    Args:
        x: (..., K). weight: (N, K). bias: (N,) or None.

    Returns:
        (..., N).
    """
    if not takes_onednn(x, weight):
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return _OneDNNLinear.apply(x, weight, bias)
    return _product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same arguments, parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


def use_onednn_linear(module: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` inside ``module`` (a timm or ``transformers`` tower's) to :class:`Linear`.

    Only the class changes: the parameters, their initialisation and the state dict stay as they are.

    Returns:
        How many were switched.
    """
    switched = 0
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = Linear
            switched += 1
    return switched
