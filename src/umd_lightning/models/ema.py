"""The EMA teacher of MR-Pretrain and TD-Calib (UMD_SPEC 2.4)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A frozen copy of a module, moved towards the student after every optimiser step.

    ``theta_t <- m * theta_t + (1 - m) * theta_s``; buffers are copied. The reference implementation updates
    after every micro-batch, which under gradient accumulation ``G`` equals momentum ``m ** G`` per optimiser
    step: pass that momentum here to reproduce it.

    The teacher never takes gradients, stays in eval mode whatever ``train()`` is called with, and is saved in the
    owning module's state dict (so checkpoints carry it and DDP ranks start from rank 0's copy).

    Args:
        student: the module to copy (the backbone).
        momentum: ``m`` in [0, 1].
    """

    def __init__(self, student: nn.Module, momentum: float = 0.995) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(False)
        return self

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of ``student``'s current weights and buffers."""
        self.module.load_state_dict(student.state_dict())

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` (call once per optimiser step)."""
        teacher_params = list(self.module.parameters())
        student_params = list(student.parameters())
        if len(teacher_params) != len(student_params):
            raise RuntimeError("EMA teacher and student have different parameter lists")
        student_values = [s.detach().to(t.dtype) for t, s in zip(teacher_params, student_params)]
        # theta_t + (1 - m) * (theta_s - theta_t) = m * theta_t + (1 - m) * theta_s in one multi-tensor kernel
        # per group of tensors: the update torch.optim.swa_utils.get_ema_multi_avg_fn makes. AveragedModel itself
        # is not used: the teacher must stay in eval mode, copy buffers and keep its state-dict names.
        torch._foreach_lerp_(teacher_params, student_values, 1.0 - self.momentum)
        for teacher_buffer, student_buffer in zip(self.module.buffers(), student.buffers()):
            teacher_buffer.copy_(student_buffer)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
