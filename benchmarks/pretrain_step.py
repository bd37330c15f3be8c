"""Time one MR-Pretrain optimiser step per preset, its peak memory, and how its passes share the time.

    python benchmarks/pretrain_step.py --presets tiny small --batch 8 [--device cuda --precision bf16]

The step is timed as a whole (forward of all passes, backward, AdamW, EMA update), then each pass's forward is
timed alone: the student's masked pass (75% of patches dropped), the EMA teacher's full pass, the student's ITM
pass; the rest of the step is the heads (MIM decoder, MLM, ITM), the losses, the backward pass, AdamW and the EMA
update. Memory is the process's peak resident set on the CPU
(``ru_maxrss``; it includes the Python runtime and libraries) and ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import time

import torch

from umd_lightning.models.masking import random_masking
from umd_lightning.stages import MRPretrain


def make_batch(batch: int, size: int, length: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(vocab, 20000), (batch, length), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, 1 : 1 + length // 7] = ids[:, 1 : 1 + length // 7]
    masked = ids.clone()
    masked[labels != -100] = 103
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=gen).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mlm_input_ids": masked.to(device),
        "mlm_labels": labels.to(device),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def bench(
    preset: str, batch: int, length: int, steps: int, device: torch.device, precision: str, text_model: str = "minilm"
) -> dict:
    torch.manual_seed(0)
    model = MRPretrain(preset=preset, text_model=text_model).to(device)
    model.teacher.copy_from(model.backbone)
    size = model.backbone_config.image_size
    data = make_batch(batch, size, length, model.backbone.text.vocab_size, device)
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model.reconstruction_losses(data)[0]["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.teacher.update(model.backbone)

    grid = model.backbone.vision.grid_size((size, size))
    keep, _ = random_masking(batch, grid[0] * grid[1], 0.75, device)

    def student_masked() -> None:
        with autocast:
            model.backbone(data["pixel_values"], data["mlm_input_ids"], data["attention_mask"], keep)

    def teacher() -> None:
        with autocast:
            model.teacher(data["pixel_values"], data["input_ids"], data["attention_mask"])

    def itm() -> None:
        with autocast:
            model.backbone(data["pixel_values"], data["input_ids"], data["attention_mask"], None)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_time = timed(step, device, steps)
    parts = {
        name: timed(fn, device, steps)
        for name, fn in (("student masked pass", student_masked), ("teacher pass", teacher), ("ITM pass", itm))
    }
    parts["heads, losses, backward, AdamW, EMA"] = max(0.0, step_time - sum(parts.values()))
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    return {
        "preset": preset,
        "image": size,
        "step_s": step_time,
        "memory_mib": memory,
        "params": params,
        "parts": parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=40, help="tokens per caption")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"MR-Pretrain step, batch {args.batch}, {args.length} tokens, {args.precision}, {where}")
    for preset in args.presets:
        result = bench(preset, args.batch, args.length, args.steps, device, args.precision)
        memory_kind = "peak CUDA allocated" if device.type == "cuda" else "peak process RSS"
        print(f"\n{preset}: {result['params'] / 1e6:.1f} M trainable parameters, {result['image']} px")
        print(f"  one optimiser step: {result['step_s'] * 1000:.0f} ms, {memory_kind} {result['memory_mib']:.0f} MiB")
        for name, seconds in result["parts"].items():
            print(f"  {name:<40} {seconds * 1000:7.0f} ms  {100 * seconds / result['step_s']:5.1f} %")


if __name__ == "__main__":
    main()
