"""GM-Coord: gradient modulation between the text and image sides during fine-tuning (UMD_SPEC 4.2).

Each optimiser step, the task head scores each modality alone (uni-modal logits from the pooled vectors), the
modality that explains the targets better is "ahead", and its gradients are shrunk by
``k = 1 - tanh(alpha * rho)``; then Gaussian noise scaled by each parameter's own gradient std is added (the
reference's "Gaussian enhancement").

The arithmetic lives in small pure functions (:func:`unimodal_logits`, :func:`scores`, :func:`coefficients`,
:func:`rescale_`) so it can be checked against hand-computed numbers; :class:`GMCoord` only wires them
to Lightning:

* ``on_after_backward`` (once per micro-batch) reads ``pl_module.gm_coord_inputs`` and adds the micro-batch's
  scores to an accumulator, so gradient accumulation sums over all micro-batches of the step;
* ``on_before_optimizer_step`` (once per optimiser step, after the last micro-batch's backward, after AMP
  unscaling, before gradient clipping and the step) sums the scores over all ranks, computes the coefficients
  and rescales the gradients. Every rank sees the same all-reduced gradients, the same summed scores and noise
  from a generator seeded by (seed, global step), so the replicas stay bitwise identical under DDP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from umd_lightning.errors import ConfigError, check_range
from umd_lightning.seeds import run_seed

UnimodalMode = Literal["reference", "zero_other"]
Formula = Literal["reference", "relu_shift"]
ALPHA_WARN_ABOVE = 10.0
"""An ``alpha`` above this makes the modulation all-or-nothing (tanh saturates); the callback warns once."""

_STD_FLOOR = 1e-8
"""Added to each gradient's std before drawing noise (UMD_SPEC 4.2 step 5): all-zero gradients get a tiny kick."""


@dataclass(frozen=True)
class GMCoordInputs:
    """What the task module hands GM-Coord for one micro-batch (set in ``training_step``).

    Attributes:
        text: pooled text vectors ``h_t``, detached: (B, D), or (B, C, D) for retrieval (C candidates).
        image: pooled image vectors ``h_v``, detached, same shape as ``text``.
        target: (B,) int64, index of the true answer / class / candidate over the last dim of the uni-modal
            logits (VQA: argmax of the target vector; retrieval: 0, the true caption).
    """

    text: Tensor
    image: Tensor
    target: Tensor


class GMCoordModule(Protocol):
    """What a LightningModule must offer for :class:`GMCoord`.

    Attributes:
        gm_coord_inputs: set anew in every ``training_step``; the callback consumes it (sets it to ``None``)
            after the micro-batch's backward, so a step that forgets to set it fails loudly instead of reusing
            stale vectors.
    """

    gm_coord_inputs: GMCoordInputs | None

    def gm_coord_modalities(self) -> dict[str, list[nn.Module]]:
        """The modules whose gradients are rescaled, under the keys ``"text"`` and ``"image"``."""
        ...

    def gm_coord_head(self) -> nn.Module:
        """The task head; its last ``nn.Linear`` maps the joint vector (2D) to the logits."""
        ...


def final_linear(head: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in ``head.modules()``: the layer that produces the task logits.

    Raises:
        ValueError: the head has no ``nn.Linear``.
    """
    linears = [module for module in head.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"GM-Coord needs a head ending in nn.Linear, got {type(head).__name__} without one")
    return linears[-1]


@torch.no_grad()
def unimodal_logits(head: nn.Module, h_t: Tensor, h_v: Tensor, mode: UnimodalMode) -> tuple[Tensor, Tensor]:
    """Logits of each modality alone (UMD_SPEC 4.2 step 1), without gradient.

    ``reference``: split the head's final Linear ``W`` (out x 2D), ``b`` into its text and image halves,
    ``z_t = h_t W[:, :D]^T + b/2`` and ``z_v = h_v W[:, D:]^T + b/2``; the head's earlier layers are skipped,
    as in the reference, which makes this an approximation for multi-layer heads. ``zero_other``: run the
    whole head with the other modality's half of the joint vector set to zero. The head is run in whatever
    train/eval mode it is in (the UMD heads have no dropout or batch norm).

    Args:
        head: the task head, input width 2D.
        h_t: (B, D) or (B, C, D) pooled text vectors.
        h_v: same shape as ``h_t``, pooled image vectors.
        mode: ``reference`` or ``zero_other``.

    Returns:
        ``(z_t, z_v)``, each (B, out) or (B, C, out); a head with one output is squeezed to (B,) or (B, C).
        Computed in the head's parameter dtype.
    """
    if h_t.shape != h_v.shape:
        raise ValueError(f"text and image vectors must have the same shape, got {tuple(h_t.shape)}, {tuple(h_v.shape)}")
    linear = final_linear(head)
    width = h_t.shape[-1]
    dtype = linear.weight.dtype
    h_t, h_v = h_t.to(dtype), h_v.to(dtype)
    if mode == "reference":
        if linear.in_features != 2 * width:
            raise ValueError(f"final Linear takes {linear.in_features} inputs, expected 2 * D = {2 * width}")
        half_bias = linear.bias / 2 if linear.bias is not None else 0.0
        z_t = h_t @ linear.weight[:, :width].T + half_bias
        z_v = h_v @ linear.weight[:, width:].T + half_bias
    elif mode == "zero_other":
        zeros = torch.zeros_like(h_t)
        z_t = head(torch.cat([h_t, zeros], dim=-1))
        z_v = head(torch.cat([zeros, h_v], dim=-1))
    else:
        raise ValueError(f"unimodal must be 'reference' or 'zero_other', got {mode!r}")
    if linear.out_features == 1:
        z_t, z_v = z_t.squeeze(-1), z_v.squeeze(-1)
    return z_t, z_v


def scores(z: Tensor, target: Tensor) -> Tensor:
    """``s = sum_i softmax(z)[i, y_i]`` (UMD_SPEC 4.2 step 2): the total probability mass on the true classes.

    Args:
        z: (B, K) logits over the last dim (K answers, classes or retrieval candidates).
        target: (B,) int64 indices into the last dim of ``z``.

    Returns:
        0-dim float32 tensor on ``z``'s device.
    """
    if z.dim() != 2 or target.shape != z.shape[:1]:
        raise ValueError(f"expected z (B, K) and target (B,), got {tuple(z.shape)} and {tuple(target.shape)}")
    probabilities = z.float().softmax(dim=-1)
    return probabilities.gather(1, target.long().unsqueeze(1)).sum()


def coefficients(
    s_t: Tensor | float, s_v: Tensor | float, alpha: float, formula: Formula, eps: float = 1e-8
) -> tuple[Tensor, Tensor, Tensor]:
    """Ratio and gradient coefficients of both modalities (UMD_SPEC 4.2 steps 3-4).

    ``rho_t = s_t / (s_v + eps)`` and ``rho_v = 1 / max(rho_t, eps)``. ``reference``: if ``rho_t > 1`` then
    ``k_t = 1 - tanh(alpha * rho_t)``, ``k_v = 1``, else ``k_v = 1 - tanh(alpha * rho_v)``, ``k_t = 1`` (note
    that this jumps at ``rho = 1``: both ``k`` are below 1 right next to it). ``relu_shift``:
    ``k_m = 1 - tanh(alpha * relu(rho_m - 1))``, continuous, and 1 for both modalities at ``rho = 1``.

    Computed with tensor ops only (no host sync).

    Returns:
        ``(rho_t, k_t, k_v)``, 0-dim float tensors.
    """
    s_t = torch.as_tensor(s_t, dtype=torch.float32)
    s_v = torch.as_tensor(s_v, dtype=torch.float32, device=s_t.device)
    rho_t = s_t / (s_v + eps)
    rho_v = 1.0 / rho_t.clamp_min(eps)
    one = torch.ones_like(rho_t)
    if formula == "reference":
        text_ahead = rho_t > 1
        k_t = torch.where(text_ahead, 1 - torch.tanh(alpha * rho_t), one)
        k_v = torch.where(text_ahead, one, 1 - torch.tanh(alpha * rho_v))
    elif formula == "relu_shift":
        k_t = 1 - torch.tanh(alpha * torch.relu(rho_t - 1))
        k_v = 1 - torch.tanh(alpha * torch.relu(rho_v - 1))
    else:
        raise ValueError(f"formula must be 'reference' or 'relu_shift', got {formula!r}")
    return rho_t, k_t, k_v


@torch.no_grad()
def rescale_(
    params: Iterable[nn.Parameter],
    k: Tensor | float,
    noise: bool,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> None:
    """Rescale gradients in place and add the Gaussian enhancement noise (UMD_SPEC 4.2 step 5).

    For each parameter with a gradient: ``g <- k * g``, then if ``noise``,
    ``g <- g + N(0, 1) * (std(g_before) + 1e-8) * noise_scale`` element-wise, ``std(g_before)`` being that
    parameter's gradient std (unbiased) before rescaling (0 for a one-element gradient). The noise is drawn from
    ``generator`` on that generator's device (the gradients' device, so a GPU run does not generate millions of
    numbers on the CPU every step): processes with the same generator state on the same kind of device add the
    same noise. Parameters whose ``grad`` is ``None`` are skipped without drawing.

    On a GPU the noise is drawn from ``generator`` parameter by parameter in the given order. On a CPU, where
    PyTorch's generator (mt19937) draws one number after another on one core (about 3 ns a number, 33 M numbers
    for a ``small`` fine-tuning step), ``generator`` draws one 32-bit seed per parameter, in order, and each
    parameter's noise comes from its own generator with that seed; the draws then run on
    ``torch.get_num_threads()`` threads and each is added to its gradient in place as it arrives. The noise of
    a parameter depends only on ``generator``'s state and the parameter's position among those with gradients,
    not on the number of threads.
    """
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return
    # Multi-tensor ops where torch has them (one kernel per group of gradients instead of one per parameter);
    # the per-parameter std and the noise draws stay one per parameter, in order, so that the noise stream is
    # the same whatever the grouping.
    if noise:
        stds = [g.float().std() if g.numel() > 1 else g.new_zeros((), dtype=torch.float32) for g in grads]
        scales = torch._foreach_mul(torch._foreach_add(stds, _STD_FLOOR), noise_scale)
    k_tensor = torch.as_tensor(k, dtype=torch.float32, device=grads[0].device)
    torch._foreach_mul_(grads, k_tensor)
    if not noise:
        return
    device = generator.device if generator is not None else grads[0].device
    if device.type == "cpu" and all(g.device.type == "cpu" for g in grads):
        _add_cpu_noise_(grads, torch.stack(scales).tolist(), generator)
        return
    draws = [torch.randn(g.shape, generator=generator, device=device, dtype=torch.float32) for g in grads]
    draws = [(d.to(g.device) * scale).to(g.dtype) for d, g, scale in zip(draws, grads, scales)]
    torch._foreach_add_(grads, draws)


def _add_cpu_noise_(grads: Sequence[Tensor], scales: Sequence[float], generator: torch.Generator | None) -> None:
    """``g += N(0, 1) * scale`` for each CPU gradient, the standard normals of each from its own generator
    seeded by ``generator`` (see :func:`rescale_`), drawn on ``torch.get_num_threads()`` threads."""
    seeds = torch.randint(0, 2**32, (len(grads),), generator=generator).tolist()

    def draw(index: int) -> Tensor:
        own = torch.Generator().manual_seed(seeds[index])
        return torch.randn(grads[index].shape, generator=own, dtype=torch.float32)

    # PyTorch releases the GIL while it draws, so the threads draw side by side.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        for grad, normals, scale in zip(grads, pool.map(draw, range(len(grads))), scales, strict=True):
            grad.add_(normals, alpha=scale)


_SEED_MULTIPLIER = 2654435761
"""Odd (Knuth's multiplicative hash), so ``seed * M + step`` gives each step of a run its own 32-bit seed."""


def noise_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the run seed and the global step: same on every rank, new every step.

    The CPU generator (mt19937) keeps only the low 32 bits of its seed, so seed and step are mixed into 32
    bits rather than packed side by side.
    """
    return torch.Generator(device=device).manual_seed((seed * _SEED_MULTIPLIER + step) % 2**32)


class GMCoord(pl.Callback):
    """GM-Coord gradient modulation for fine-tuning (UMD_SPEC 4.2), acting once per optimiser step.

    The LightningModule must follow :class:`GMCoordModule`: set ``gm_coord_inputs`` in ``training_step`` and
    expose ``gm_coord_modalities()`` and ``gm_coord_head()``. Only automatic optimisation with one optimiser
    is supported (the hook runs when that optimiser steps).

    Logged every step (``on_step``): ``gm_coord/s_t``, ``gm_coord/s_v``, ``gm_coord/rho_t``, ``gm_coord/k_t``,
    ``gm_coord/k_v``; the same values stay in :attr:`last_stats`.

    Args:
        alpha: ``alpha_gm``, the modulation strength (reference 0.1).
        unimodal: how uni-modal logits are formed: ``reference`` splits the head's final Linear (skipping its
            earlier layers), ``zero_other`` runs the whole head with the other modality zeroed.
        formula: ``reference`` (only the modality ahead is damped, jump at rho = 1) or ``relu_shift``
            (``1 - tanh(alpha * relu(rho - 1))`` for both, continuous at rho = 1).
        noise: add the Gaussian enhancement noise after rescaling (reference: on).
        noise_scale: multiplies the noise std ``std(g_before) + 1e-8`` (reference 1.0).
        start_epoch: first epoch (0-based) in which GM-Coord acts.
        end_epoch: first epoch in which it no longer acts; ``None``: to the end of training.
        eps: guards the ratio against a zero denominator.
        seed: seed of the noise; ``None``: the run's seed (``PL_GLOBAL_SEED``, set by ``seed_everything``),
            else 0.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        unimodal: UnimodalMode = "reference",
        formula: Formula = "reference",
        noise: bool = True,
        noise_scale: float = 1.0,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        eps: float = 1e-8,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if unimodal not in ("reference", "zero_other"):
            raise ConfigError(f"GMCoord unimodal must be 'reference' or 'zero_other', got {unimodal!r}")
        if formula not in ("reference", "relu_shift"):
            raise ConfigError(f"GMCoord formula must be 'reference' or 'relu_shift', got {formula!r}")
        check_range("GMCoord alpha", alpha, low=0.0)
        check_range("GMCoord noise_scale", noise_scale, low=0.0)
        check_range("GMCoord eps", eps, low=0.0, low_open=True)
        check_range("GMCoord start_epoch", start_epoch, low=0)
        if end_epoch is not None and end_epoch <= start_epoch:
            raise ConfigError(f"GMCoord end_epoch={end_epoch} must be above start_epoch={start_epoch} (or null)")
        if alpha > ALPHA_WARN_ABOVE:
            rank_zero_warn(
                f"GMCoord alpha={alpha:g}: 1 - tanh(alpha * rho) is about 0 for any rho above {3 / alpha:.2g}, so "
                "the modality ahead keeps almost none of its gradient and gets only the added noise; the reference "
                f"uses 0.1 (values above {ALPHA_WARN_ABOVE:g} are rarely meant)"
            )
        self.alpha = alpha
        self.unimodal: UnimodalMode = unimodal
        self.formula: Formula = formula
        self.noise = noise
        self.noise_scale = noise_scale
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.eps = eps
        self.seed = seed
        self.last_stats: dict[str, float] = {}
        self._run_seed: int | None = None
        # (s_t, s_v, samples) summed over this process's micro-batches of the current optimiser step.
        self._sums: Tensor | None = None
        self._params: dict[str, list[nn.Parameter]] = {}

    def is_active(self, epoch: int) -> bool:
        """Whether GM-Coord acts in ``epoch`` (0-based)."""
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module's interface and fix the noise seed (a restored checkpoint's seed overrides it)."""
        missing = [name for name in ("gm_coord_modalities", "gm_coord_head") if not hasattr(pl_module, name)]
        if missing:
            raise TypeError(
                f"GMCoord needs a module implementing GMCoordModule; {type(pl_module).__name__} lacks {missing}"
            )
        self._run_seed = run_seed(self.seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect each modality's parameters once the model is built and wrapped."""
        modalities = pl_module.gm_coord_modalities()
        if set(modalities) != {"text", "image"}:
            raise ValueError(f"gm_coord_modalities() must have keys 'text' and 'image', got {sorted(modalities)}")
        self._params = {name: _unique_parameters(modalities[name]) for name in ("text", "image")}
        text_ids = {id(param) for param in self._params["text"]}
        if any(id(param) in text_ids for param in self._params["image"]):
            raise ValueError("a parameter is on both the text and the image side of gm_coord_modalities()")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add this micro-batch's uni-modal scores to the step's accumulator."""
        if not self.is_active(trainer.current_epoch):
            return
        inputs: GMCoordInputs | None = getattr(pl_module, "gm_coord_inputs", None)
        if inputs is None:
            raise RuntimeError(
                "GMCoord: training_step must set self.gm_coord_inputs = GMCoordInputs(...) for every micro-batch"
            )
        pl_module.gm_coord_inputs = None
        z_t, z_v = unimodal_logits(pl_module.gm_coord_head(), inputs.text, inputs.image, self.unimodal)
        batch = torch.tensor(float(inputs.target.shape[0]), device=z_t.device)
        step_sums = torch.stack([scores(z_t, inputs.target), scores(z_v, inputs.target), batch])
        self._sums = step_sums if self._sums is None else self._sums.to(step_sums.device) + step_sums

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Sum the scores over ranks, compute the coefficients and rescale (plus noise) the gradients."""
        if not self.is_active(trainer.current_epoch):
            self._sums = None
            return
        local = self._sums if self._sums is not None else torch.zeros(3, device=pl_module.device)
        self._sums = None
        # Every rank must join the collective, even one whose micro-batches gave no scores.
        total = trainer.strategy.reduce(local.to(pl_module.device).clone(), reduce_op="sum")
        if total[2].item() == 0:
            return
        s_t, s_v = total[0], total[1]
        rho_t, k_t, k_v = coefficients(s_t, s_v, self.alpha, self.formula, self.eps)
        generator = noise_generator(self._run_seed or 0, trainer.global_step, pl_module.device) if self.noise else None
        rescale_(self._params["text"], k_t, self.noise, self.noise_scale, generator)
        rescale_(self._params["image"], k_v, self.noise, self.noise_scale, generator)
        stats = {"s_t": s_t, "s_v": s_v, "rho_t": rho_t, "k_t": k_t, "k_v": k_v}
        for name, value in stats.items():
            pl_module.log(f"gm_coord/{name}", value, on_step=True, on_epoch=False)
        self.last_stats = {name: float(value) for name, value in stats.items()}

    def state_dict(self) -> dict[str, Any]:
        """The noise seed and, when saved in the middle of an accumulation, this process's partial scores."""
        return {"seed": self._run_seed, "sums": None if self._sums is None else self._sums.detach().cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the accumulator moves to the model's device on next use)."""
        self._run_seed = state_dict["seed"]
        self._sums = state_dict["sums"]


def _unique_parameters(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules`` in module order, each once (modules may share or nest)."""
    seen: set[int] = set()
    unique = []
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                unique.append(param)
    return unique
