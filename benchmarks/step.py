"""What one optimiser step costs, and how far it is from what the machine can do.

    python benchmarks/step.py --presets small --precisions fp32 bf16 --texts fixed medpix [--stage pretrain]
    python benchmarks/step.py ... --compare OLD_SRC      # interleaved A/B: this checkout vs another's src/

For each preset x precision x text-length mode, in a fresh process (so that peak memory is that run's own):

* **step time**: median and minimum of ``--repeats`` (>= 8) timed steps after ``--warmup`` steps, each step the
  training step as the stage runs it: all forward passes and losses, the NaN guard, the backward pass, then
  GM-Coord (fine-tuning), AdamW (the stage's own ``make_optimizer``) and the EMA update (pre-training);
* **FLOPs per step**, counted by ``torch.utils.flop_counter.FlopCounterMode`` over one step's forward and
  backward (matmuls, convolutions and attention; element-wise work is not counted, so MFU is a lower bound);
* **the machine's matmul peak for that dtype, measured in the same run** (the best of several large square
  matmuls, on a CPU with PyTorch's own kernel and with oneDNN's) and **MFU** = FLOPs / step time / that peak;
* **peak memory**: process RSS high-water mark on the CPU (it includes Python and the libraries),
  ``torch.cuda.max_memory_allocated`` on a GPU;
* **saved for backward**: the bytes of the tensors one step's forward keeps for its backward pass (parameters
  left out), on any device: the activation memory that gradient checkpointing trades for recomputation;
* **the share of each part**, from the same timed steps: forward + losses, backward, GM-Coord, AdamW, EMA, and
  (pre-training) the forward of each pass alone (student's masked pass, teacher pass, ITM pass) timed separately.

Text lengths: ``fixed`` pads every caption to ``--length`` tokens, all of them real (the worst case, and what
padding to the maximum costs); ``medpix`` uses real MedPix 2.0 captions (``../shared/data``), tokenised with the
tower's tokenizer and padded per batch, as the DataModule's collator does: the same step on the text lengths a run
actually sees. Images are random (decoding is the data benchmark's business).

``--compare OLD_SRC`` runs every configuration alternately with this checkout's ``src`` and ``OLD_SRC`` (an older
checkout's ``src`` folder, e.g. a ``git worktree`` at the commit before a change), ``--rounds`` times each, and
prints both with the ratio: the before / after of a change, measured side by side under the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MEDPIX = REPO.parent / "shared" / "data" / "medpix_2_0"


# ------------------------------------------------------------------------------------------------ machine peak
def matmul_peak(dtype: torch.dtype, device: torch.device, size: int | None = None, repeats: int = 6) -> float:
    """Best FLOP/s of ``size x size`` matmuls in ``dtype`` (2 n^3 FLOPs each).

    On a CPU the best of PyTorch's own matmul (MKL for fp32) and oneDNN's (what ``models/linear.py`` runs fp32
    linears on): on AMD CPUs MKL's fp32 path uses AVX2 only, about half of what the cores can do, so a peak taken
    from it alone would overstate every MFU.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    kernels = [lambda: a @ b]
    # The op is looked up here, not taken from models/linear.py: with --compare this runs against older
    # checkouts, which have no such module.
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if device.type == "cpu" and onednn is not None:
        kernels.append(lambda: onednn(a, b, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            kernel().sum()
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ batches
def medpix_captions() -> list[str]:
    from umd_lightning.data.sources.medpix import medpix_records

    if not MEDPIX.is_dir():
        raise SystemExit(f"--texts medpix needs the MedPix 2.0 copy at {MEDPIX}")
    return [r.text for r in medpix_records(MEDPIX) if r.split == "train"]


def text_batches(mode: str, tokenizer: Any, batch: int, length: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` tokenised caption batches: all ``length`` tokens real (``fixed``) or real MedPix captions padded
    per batch to their longest (at most ``length``)."""
    gen = torch.Generator().manual_seed(0)
    if mode == "fixed":
        out = []
        for _ in range(count):
            ids = torch.randint(1000, min(tokenizer.vocab_size, 20000), (batch, length), generator=gen)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return out
    captions = medpix_captions()
    order = torch.randperm(len(captions), generator=gen).tolist()
    out = []
    for i in range(count):
        chosen = [captions[j] for j in order[i * batch : (i + 1) * batch]]
        tokens = tokenizer(chosen, padding=True, truncation=True, max_length=length, return_tensors="pt")
        out.append({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    return out


def with_mlm(texts: dict[str, torch.Tensor], mask_id: int) -> dict[str, torch.Tensor]:
    """15% of the real tokens (not the first) masked for MLM, as the collator does (seeded)."""
    gen = torch.Generator().manual_seed(1)
    ids, mask = texts["input_ids"], texts["attention_mask"].bool()
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & mask
    chosen[:, 0] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {**texts, "mlm_input_ids": torch.where(chosen, torch.full_like(ids, mask_id), ids), "mlm_labels": labels}


# ------------------------------------------------------------------------------------------------ one run
def run_components(args: argparse.Namespace) -> dict[str, Any]:
    """The step's overheads alone, each repeated ``--repeats`` x 3 times on the real parameters and gradients of
    one MR-Pretrain step: AdamW's update, the EMA update, the NaN guard over the step's loss terms and GM-Coord's
    rescaling with noise of the two sides. The minimum is the figure to compare (it is what load cannot add to)."""
    from umd_lightning.callbacks import gm_coord as G

    torch.manual_seed(0)
    device = torch.device(args.device)
    args.stage = "pretrain"
    model, _ = build(args, device)
    from umd_lightning.models.text import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    size = model.backbone_config.image_size
    (text,) = text_batches("fixed", tokenizer, args.batch, args.length, 1)
    batch = {"pixel_values": torch.randn(args.batch, 3, size, size), **with_mlm(text, tokenizer.mask_token_id)}
    batch = {k: v.to(device) for k, v in batch.items()}
    terms, _ = model.reconstruction_losses(batch)
    terms["loss"].backward()
    optimizer = model._bench_optimizer
    sides = (
        {name: G._unique_parameters(modules) for name, modules in model.gm_coord_modalities().items()}
        if hasattr(model, "gm_coord_modalities")
        else {"text": list(model.backbone.text.parameters()), "image": list(model.backbone.vision.parameters())}
    )
    generator = G.noise_generator(0, 0, device)
    k = torch.tensor(0.9, device=device)
    parts = {
        "AdamW step": optimizer.step,
        "EMA update": lambda: model.teacher.update(model.backbone),
        "NaN guard": lambda: model.check_finite({name: value.detach() for name, value in terms.items()}),
        "GM-Coord rescale + noise": lambda: (
            G.rescale_(sides["text"], k, True, 1.0, generator),
            G.rescale_(sides["image"], k, True, 1.0, generator),
        ),
    }
    out: dict[str, Any] = {}
    for name, fn in parts.items():
        fn()  # warm-up
        samples = []
        for _ in range(3 * args.repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples.append(time.perf_counter() - start)
        out[name] = {"min": min(samples), "median": statistics.median(samples)}
    return {"preset": args.preset, "kernel": model._bench_kernel, "components": out}


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from umd_lightning.models.text import load_tokenizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cuda" and args.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True  # what "fp32" means on a GPU here: TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    model, step_parts = build(args, device)
    tokenizer = load_tokenizer("minilm")
    size = model.backbone_config.image_size
    count = args.warmup + args.repeats
    texts = text_batches(args.texts, tokenizer, args.batch, args.length, count)
    gen = torch.Generator().manual_seed(2)
    batches = []
    for text in texts:
        item = {"pixel_values": torch.randn(args.batch, 3, size, size, generator=gen), **text}
        if args.stage == "pretrain":
            item = {**item, **with_mlm(text, tokenizer.mask_token_id)}
        else:
            item["targets"] = torch.zeros(args.batch, model.hparams.num_outputs)
            item["targets"][torch.arange(args.batch), torch.randint(0, 64, (args.batch,), generator=gen)] = 1
        batches.append({k: v.to(device) for k, v in item.items()})
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    )
    parts: dict[str, list[float]] = {}
    steps: list[float] = []
    for index, batch in enumerate(batches):
        times = step_parts(batch, autocast)
        if index >= args.warmup:
            steps.append(sum(times.values()))
            for name, seconds in times.items():
                parts.setdefault(name, []).append(seconds)
        if device.type == "cuda" and index == args.warmup - 1:
            torch.cuda.reset_peak_memory_stats()
    flops, saved = count_flops(model, batches[0], autocast, args.stage)
    passes = pass_times(model, batches[0], autocast, device, args) if args.stage == "pretrain" else {}
    peak = matmul_peak(dtype, device)
    median = statistics.median(steps)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = statistics.mean(float(b["attention_mask"].shape[1]) for b in batches)
    return {
        "preset": args.preset,
        "precision": args.precision,
        "texts": args.texts,
        "stage": args.stage,
        "batch": args.batch,
        "image": size,
        "tokens": tokens,
        "step_median_s": median,
        "step_min_s": min(steps),
        "flops": flops,
        "peak_flops": peak,
        "mfu": flops / median / peak,
        "memory_mib": memory,
        "saved_for_backward_mib": saved / 2**20,
        "parts": {name: statistics.median(values) for name, values in parts.items()},
        "passes": passes,
        "threads": torch.get_num_threads(),
        "kernel": getattr(model, "_bench_kernel", "?"),
    }


def build(args: argparse.Namespace, device: torch.device):
    """The stage's model and a function running one timed training step part by part."""
    from umd_lightning.stages import FineTune, MRPretrain

    options: dict[str, Any] = {"text_model": "minilm"}
    if args.preset == "base":
        # RoBERTa-base's shape (12 x 768, FFN 3072) with random weights and MiniLM's tokenizer: nothing to
        # download, the same FLOPs per token as the paper's text tower (only the embedding table is smaller).
        shape = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
        options["backbone_overrides"] = {"text.pretrained": False, "text.overrides": shape}
    if args.kernel:
        options["optimizer_kernel"] = args.kernel
    if args.gradient_checkpointing:
        options["gradient_checkpointing"] = True
    if args.stage == "pretrain":
        model = MRPretrain(preset=args.preset, image_size=args.image_size, **options).to(device)
        model.teacher.copy_from(model.backbone)
    else:
        model = FineTune(preset=args.preset, image_size=args.image_size, task="vqa", num_outputs=458, **options).to(
            device
        )
    if args.compile:
        model.compile_modules()
    model.train()
    # The stage's own optimiser (fused / foreach AdamW where it chooses so); an older checkout without
    # make_optimizer gets what its configure_optimizers built: plain AdamW over the same groups.
    if hasattr(model, "make_optimizer"):
        optimizer = model.make_optimizer()
    else:
        optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-5, betas=(0.9, 0.98), eps=1e-8)
    model._bench_optimizer = optimizer
    group = optimizer.param_groups[0]
    model._bench_kernel = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for_loop"
    gm = gm_coord_for(model) if args.stage == "finetune" else None

    def clock(times: dict[str, float], name: str, start: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        times[name] = now - start
        return now

    def step(batch: dict[str, torch.Tensor], autocast) -> dict[str, float]:
        times: dict[str, float] = {}
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            if args.stage == "pretrain":
                terms, _ = model.reconstruction_losses(batch)
            else:
                logits, out = model._logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
                loss, target = model._loss(logits, batch)
                terms = {"loss": loss}
        model.check_finite(terms)
        start = clock(times, "forward + losses", start)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        start = clock(times, "backward", start)
        if gm is not None:
            gm(out, target)
            start = clock(times, "GM-Coord", start)
        optimizer.step()
        start = clock(times, "AdamW", start)
        if args.stage == "pretrain":
            model.teacher.update(model.backbone)
            clock(times, "EMA", start)
        return times

    return model, step


def gm_coord_for(model):
    """GM-Coord's per-step work (scores, coefficients, rescaling with noise) on the model's two sides."""
    from umd_lightning.callbacks import gm_coord as G

    params = {
        name: G._unique_parameters(modules) for name, modules in model.gm_coord_modalities().items()
    }  # the callback's own parameter lists

    def apply(out, target) -> None:
        z_t, z_v = G.unimodal_logits(
            model.gm_coord_head(), out.text_pooled.detach(), out.image_pooled.detach(), "reference"
        )
        s_t, s_v = G.scores(z_t, target), G.scores(z_v, target)
        _, k_t, k_v = G.coefficients(s_t, s_v, 0.1, "reference")
        generator = G.noise_generator(0, 0, next(model.parameters()).device)
        G.rescale_(params["text"], k_t, True, 1.0, generator)
        G.rescale_(params["image"], k_v, True, 1.0, generator)

    return apply


def count_flops(model, batch, autocast, stage: str) -> tuple[float, int]:
    """FLOPs of one step's forward and backward, and the bytes its forward kept for the backward pass: every
    tensor autograd saved, each storage counted once, parameters left out (what gradient checkpointing shrinks;
    inside a checkpointed block autograd saves nothing, the block's inputs are saved outside it)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a layout without a storage: counted by its elements
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
            return tensor
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if stage == "pretrain":
                loss = model.reconstruction_losses(batch)[0]["loss"]
            else:
                logits, _ = model._logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
                loss = model._loss(logits, batch)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()), sum(saved.values())


def pass_times(model, batch, autocast, device, args) -> dict[str, float]:
    """Forward time of each pre-training pass alone (median of 3)."""
    from umd_lightning.models.masking import random_masking

    size = batch["pixel_values"].shape[-1]
    grid = model.backbone.vision.grid_size((size, size))
    keep, _ = random_masking(batch["pixel_values"].shape[0], grid[0] * grid[1], 0.75, device)
    runs = {
        "student masked pass": lambda: model.backbone(
            batch["pixel_values"], batch["mlm_input_ids"], batch["attention_mask"], keep
        ),
        "teacher pass": lambda: model.teacher(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]),
        "ITM pass": lambda: model.backbone(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], None),
    }
    times = {}
    for name, fn in runs.items():
        samples = []
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            with autocast:
                fn()
            synchronize(device)
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    return times


# ------------------------------------------------------------------------------------------------ driver
def configurations(args: argparse.Namespace) -> list[list[str]]:
    out = []
    for preset in args.presets:
        for precision in args.precisions:
            for texts in args.texts:
                out.append(["--preset", preset, "--precision", precision, "--text-mode", texts])
    return out


def child(src: Path, config: list[str], args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", *config]
    command += ["--batch", str(args.batch), "--length", str(args.length), "--repeats", str(args.repeats)]
    command += ["--warmup", str(args.warmup), "--device", args.device, "--stage", args.stage]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    if args.kernel:
        command += ["--kernel", args.kernel]
    if args.compile:
        command.append("--compile")
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    if getattr(args, "components", False):
        command.append("--components")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("HF_HUB_OFFLINE", "1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark run {' '.join(config)} with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(preset: str, precision: str, texts: str = "fixed", src: Path | None = None, **options: Any) -> dict:
    """One configuration in a fresh process (for other scripts, e.g. gpu_check.py); ``options`` are this script's
    flags by their ``argparse`` names (``batch``, ``length``, ``device``, ``compile``, ...)."""
    defaults = dict(
        batch=8, length=40, repeats=8, warmup=2, device="cpu", stage="pretrain", image_size=None, kernel=None,
        compile=False, gradient_checkpointing=False,
    )  # fmt: skip
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    args = argparse.Namespace(**{**defaults, **options})
    config = ["--preset", preset, "--precision", precision, "--text-mode", texts]
    return child(src or REPO / "src", config, args)


def components_table(args: argparse.Namespace) -> None:
    """``--components``: each overhead alone, this checkout (and ``--compare``'s), interleaved over rounds."""
    sources = [("after" if args.compare else "this", REPO / "src")]
    if args.compare:
        sources.insert(0, ("before", args.compare))
    for preset in args.presets:
        best: dict[str, dict[str, float]] = {}
        kernels = {}
        for _ in range(args.rounds if args.compare else 1):
            for label, src in sources:
                result = child(src, ["--preset", preset, "--precision", "fp32", "--text-mode", "fixed"], args)
                kernels[label] = result["kernel"]
                for name, times in result["components"].items():
                    key = best.setdefault(name, {})
                    key[label] = min(key.get(label, float("inf")), times["min"])
        labels = [label for label, _ in sources]
        print(
            f"\n{preset}: minimum ms over {3 * args.repeats} repeats"
            + (f" x {args.rounds} rounds" if args.compare else "")
        )
        print(f"  {'part':28s}" + "".join(f"{label + ' (' + kernels[label] + ')':>22s}" for label in labels))
        for name, values in best.items():
            row = "".join(f"{1000 * values[label]:22.1f}" for label in labels)
            ratio = f"   {values['before'] / values['after']:.1f}x" if args.compare else ""
            print(f"  {name:28s}{row}{ratio}")


def show(result: dict[str, Any], label: str = "") -> str:
    head = (
        f"{label}{result['preset']:6s} {result['precision']:4s} {result['texts']:6s} "
        f"L={result['tokens']:4.1f} {result['kernel']:8s} "
        f"median {result['step_median_s'] * 1000:8.0f} ms  min {result['step_min_s'] * 1000:8.0f} ms  "
        f"{result['flops'] / 1e9:8.1f} GFLOP  peak {result['peak_flops'] / 1e9:6.0f} GFLOP/s  "
        f"MFU {100 * result['mfu']:5.1f} %  mem {result['memory_mib']:6.0f} MiB  "
        f"saved for backward {result['saved_for_backward_mib']:6.0f} MiB"
    )
    total = result["step_median_s"]
    lines = [head]
    for name, seconds in {**result["parts"], **result["passes"]}.items():
        alone = " (forward alone)" if name in result["passes"] else ""
        lines.append(f"    {name + alone:<36} {seconds * 1000:8.1f} ms {100 * seconds / total:5.1f} %")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--texts", nargs="+", choices=["fixed", "medpix"], default=["fixed"])
    parser.add_argument("--stage", choices=["pretrain", "finetune"], default="pretrain")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=40, help="tokens per caption (fixed) / the most (medpix)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", choices=["auto", "fused", "foreach", "for_loop"], default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (and the teacher)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout's src/ to compare with")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per configuration with --compare")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument(
        "--components", action="store_true", help="time AdamW, EMA, the NaN guard and GM-Coord alone (min of many)"
    )
    # one configuration in this process (what the driver runs)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--text-mode", dest="text_mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.texts = args.text_mode
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(json.dumps(run_components(args) if args.components else run_one(args)))
        return
    if args.components:
        components_table(args)
        return
    if args.repeats < 1 or args.warmup < 1:
        raise SystemExit("--repeats and --warmup must be at least 1 (the issue's figures use 8 and 2)")
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.stage} step, batch {args.batch}, up to {args.length} tokens, {where}; {args.repeats} timed steps")
    results = []
    for config in configurations(args):
        if args.compare is None:
            result = child(REPO / "src", config, args)
            results.append(result)
            print(show(result), flush=True)
            continue
        new, old = [], []
        for _ in range(args.rounds):  # interleaved: the same load for both
            new.append(child(REPO / "src", config, args))
            old.append(child(args.compare, config, args))
        best_new = min(new, key=lambda r: r["step_median_s"])
        best_old = min(old, key=lambda r: r["step_median_s"])
        results += [{"src": "this", **r} for r in new] + [{"src": str(args.compare), **r} for r in old]
        print(show(best_old, "before "), flush=True)
        print(show(best_new, "after  "), flush=True)
        medians_new = [r["step_median_s"] for r in new]
        medians_old = [r["step_median_s"] for r in old]
        print(
            f"  after / before: {statistics.median(medians_old) / statistics.median(medians_new):.2f}x faster "
            f"(median step over {args.rounds} rounds each: {1000 * statistics.median(medians_old):.0f} -> "
            f"{1000 * statistics.median(medians_new):.0f} ms)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
