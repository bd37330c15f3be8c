"""The step's speed options compute what the plain step computes: AdamW's three kernels give the same update,
gradient checkpointing the same loss and gradients (and really recomputes), ``compile`` the same outputs; the NaN
guard still names the bad term; the step benchmark runs (smoke test on ``tiny``: it is not a timing test)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_pretrain_stage import make_batch

from umd_lightning.models.text import RowGradEmbedding
from umd_lightning.stages import FineTune, MRPretrain, NonFiniteLossError, StageError

REPO = Path(__file__).resolve().parents[1]


def tiny(**kwargs) -> MRPretrain:
    torch.manual_seed(0)
    return MRPretrain(preset="tiny", text_model="minilm", **kwargs)


def one_step(model: MRPretrain) -> dict[str, torch.Tensor]:
    optimizer = model.make_optimizer()
    generator = torch.Generator().manual_seed(5)
    loss = model.reconstruction_losses(make_batch(), generator)[0]["loss"]
    loss.backward()
    optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_adamw_kernels_give_the_same_update_and_auto_fuses_on_cpu() -> None:
    after = {kernel: one_step(tiny(optimizer_kernel=kernel, lr=1e-3)) for kernel in ("fused", "foreach", "for_loop")}
    before = {name: p.detach() for name, p in tiny().named_parameters() if p.requires_grad}
    moved = [name for name in before if not torch.equal(before[name], after["for_loop"][name])]
    assert len(moved) > 0.9 * len(before)  # the step changed (nearly) every parameter
    for kernel in ("fused", "foreach"):
        for name, value in after["for_loop"].items():
            torch.testing.assert_close(after[kernel][name], value, rtol=1e-5, atol=1e-7, msg=f"{kernel}: {name}")
    groups = tiny().make_optimizer().param_groups
    assert all(group["fused"] for group in groups)
    assert {group["weight_decay"] for group in groups} == {0.0, 0.01}  # decay / no-decay groups survive
    with pytest.raises(StageError, match=r"optimizer_kernel='fast': choose from auto, fused, foreach, for_loop"):
        tiny(optimizer_kernel="fast")
    with pytest.raises(StageError, match=r"compile='fast' is not a torch.compile backend: give true \(Inductor\) or"):
        tiny(compile="fast")


def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients() -> None:
    results = {}
    for enabled in (False, True):
        model = tiny(gradient_checkpointing=enabled)
        model.train()
        calls = {"vit block": 0, "fusion layer": 0, "text layer": 0}
        counted = {
            "vit block": model.backbone.vision.vit.blocks[0],
            "fusion layer": model.backbone.fusion.image_layers[0],
            "text layer": model.backbone.text.encoder.encoder.layer[0].attention,  # HF checkpoints forward()
        }
        # Pre-hooks: a recomputation stops as soon as it has what backward needs, before a forward hook would run.
        for name, module in counted.items():
            module.register_forward_pre_hook(
                lambda *_, name=name, calls=calls: calls.__setitem__(name, calls[name] + 1)
            )
        loss = model.reconstruction_losses(make_batch(), torch.Generator().manual_seed(5))[0]["loss"]
        forward_calls = dict(calls)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[enabled] = (loss.detach(), grads, forward_calls, dict(calls))
    (loss_off, grads_off, forward_off, calls_off), (loss_on, grads_on, forward_on, calls_on) = (
        results[False],
        results[True],
    )
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6, msg=name)
    # Without checkpointing nothing runs again in backward; with it, every student pass's layers run twice
    # (the EMA teacher's pass takes no gradient and is not recomputed).
    assert calls_off == forward_off and forward_on == forward_off
    assert all(calls_on[name] > forward_on[name] for name in calls_on), (forward_on, calls_on)


def test_the_step_benchmark_counts_what_checkpointing_saves_and_the_flops_it_adds() -> None:
    """``benchmarks/step.py``'s FLOP count and saved-for-backward bytes on the same step with and without
    gradient checkpointing: the recomputed forwards add FLOPs, and far less is kept for the backward pass."""
    spec = importlib.util.spec_from_file_location("step_benchmark", REPO / "benchmarks" / "step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    measured = {}
    for enabled in (False, True):
        model = tiny(gradient_checkpointing=enabled)
        model.train()
        model.teacher.copy_from(model.backbone)
        measured[enabled] = step.count_flops(model, make_batch(), contextlib.nullcontext(), "pretrain")
    (flops_off, saved_off), (flops_on, saved_on) = measured[False], measured[True]
    assert flops_on > 1.1 * flops_off
    assert 0 < saved_on < 0.7 * saved_off, (saved_on, saved_off)


def test_a_model_with_gradient_checkpointing_pickles() -> None:
    """ddp_spawn and notebooks pickle the model: transformers' checkpointing hook (a local function) is removed."""
    model = tiny(gradient_checkpointing=True)
    restored = pickle.loads(pickle.dumps(model))
    for backbone in (model.backbone, restored.backbone):
        assert backbone.text.encoder.is_activation_checkpointing and backbone.vision.gradient_checkpointing


@pytest.mark.slow
def test_compile_keeps_outputs_and_state_dict_keys() -> None:
    eager = tiny()
    compiled = tiny(compile=True)
    keys = list(compiled.state_dict())
    compiled.setup("fit")
    assert list(compiled.state_dict()) == keys  # nn.Module.compile: in place, no `_orig_mod.` prefix
    batch = make_batch()
    eager.eval(), compiled.eval()
    with torch.no_grad():
        want = eager.backbone(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).pooled
        got = compiled.backbone(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).pooled
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


PART_MARKS = {"vit": "vision", "encoder": "text", "image_layers": "fusion", "pixel_out": "decoder"}
"""A child found only in each compiled part, by the name dynamo's ``nn_module_stack`` gives it (``L['self'].vit``)."""


def part_modules(model, stage: str) -> dict[str, list[torch.nn.Module]]:
    """The instances of each part ``compile`` must reach: the student's (and, pre-training, the EMA teacher's)
    towers and fusion, and the MIM decoder."""
    backbones = [model.backbone, model.teacher.module] if stage == "pretrain" else [model.backbone]
    parts = {part: [getattr(b, part) for b in backbones] for part in ("vision", "text", "fusion")}
    if stage == "pretrain":
        parts["decoder"] = [model.mim_decoder]
    return parts


def loss_and_grads(model, stage: str, calls: dict[str, int] | None = None) -> tuple[torch.Tensor, dict]:
    """One training step's loss and gradients (dropout off, so that compiled and eager draw nothing); ``calls``
    counts the eager model's calls of each part."""
    model.eval()
    if calls is not None:
        for part, instances in part_modules(model, stage).items():
            for module in instances:
                module.register_forward_pre_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
    batch = make_batch()
    if stage == "pretrain":
        model.teacher.copy_from(model.backbone)
        loss = model.reconstruction_losses(batch, torch.Generator().manual_seed(5))[0]["loss"]
    else:  # retrieval: 3 candidate captions per image, the first the true one
        ids = torch.stack([batch["input_ids"].roll(shift, 0) for shift in range(3)], 1)
        mask = torch.stack([batch["attention_mask"].roll(shift, 0) for shift in range(3)], 1)
        logits = model(batch["pixel_values"], ids, mask)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", ["pretrain", "retrieval"])
def test_compile_runs_every_part_of_a_training_step_as_one_compiled_graph(stage: str) -> None:
    """The stages call the backbone's parts (``embed_image``, ``embed_text``, ``fuse``), not its ``forward``:
    compiling must reach those calls, the EMA teacher's and the MIM decoder's included, each a whole graph (no
    graph breaks). A recording backend (no Inductor, so the test is quick) counts how often each part's graphs
    run, which must equal the eager step's calls of that part; loss and gradients must equal eager's."""

    def build():
        torch.manual_seed(0)
        if stage == "pretrain":
            return MRPretrain(preset="tiny", text_model="minilm")
        return FineTune(preset="tiny", text_model="minilm", task="retrieval")

    torch._dynamo.reset()
    eager = build()
    calls = dict.fromkeys(part_modules(eager, stage), 0)
    runs = dict.fromkeys(calls, 0)

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
        children = {
            qualified.split(".")[1]
            for node in graph.graph.nodes
            for qualified, _ in node.meta.get("nn_module_stack", {}).values()
            if qualified.count(".")
        }
        parts = [PART_MARKS[child] for child in children if child in PART_MARKS]
        assert len(parts) == 1, f"a compiled graph spans {parts or 'no known part'}: {sorted(children)}"

        def run(*args: Any) -> Any:
            runs[parts[0]] += 1
            return graph.forward(*args)

        return run

    want_loss, want_grads = loss_and_grads(eager, stage, calls)
    compiled = build()
    keys = list(compiled.state_dict())
    compiled.compile_modules(backend=backend)
    assert list(compiled.state_dict()) == keys
    got_loss, got_grads = loss_and_grads(compiled, stage)
    torch._dynamo.reset()
    if stage == "pretrain":  # the student's masked and ITM passes and the teacher's pass
        assert calls["vision"] == calls["fusion"] == 3 and calls["text"] >= 2 and calls["decoder"] == 1, calls
    assert min(calls.values()) >= 1, calls
    assert runs == calls, f"compiled graph runs {runs} != calls {calls} (calls not compiled, or graph breaks)"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_row_grad_embedding_gives_the_plain_gradient_in_one_reused_dense_tensor() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Embedding(50, 8, padding_idx=0)
    rows = RowGradEmbedding.like(torch.nn.Embedding(50, 8, padding_idx=0))
    rows.weight.data.copy_(plain.weight.data)
    kept = None
    for autocast in (False, True, False):
        ids = torch.randint(0, 50, (3, 6))
        ids[0, :2] = 0  # padding: no gradient
        ids[1] = ids[2]  # repeated rows: their gradients add up
        grads = []
        for table in (plain, rows):
            table.weight.grad = None  # what zero_grad(set_to_none=True) does
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = (table(ids) * torch.arange(8.0)).sum() + (table(ids.flip(0)) ** 2).sum()  # two lookups
            loss.backward()
            grads.append(table.weight.grad)
        assert grads[1].layout == torch.strided and grads[1].dtype == torch.float32
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)  # repeated rows: another sum order
        assert grads[1][0].abs().sum() == 0
        if kept is not None:  # the same dense tensor every step (the last one still held): no new allocation
            assert grads[1].data_ptr() == kept.data_ptr()
        kept = grads[1]
    with torch.no_grad():  # no gradient wanted: the plain lookup, nothing hooked
        torch.testing.assert_close(rows(ids), plain(ids))


def test_the_text_towers_word_table_takes_its_gradient_by_rows_and_the_step_is_unchanged() -> None:
    model = tiny(lr=1e-3)
    table = model.backbone.text.encoder.get_input_embeddings()
    assert type(table) is RowGradEmbedding and not table.sparse  # DDP reads .sparse: its gradient is dense
    reference = tiny(lr=1e-3)
    plain = torch.nn.Embedding(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx)
    plain.weight = reference.backbone.text.encoder.get_input_embeddings().weight
    reference.backbone.text.encoder.set_input_embeddings(plain)
    assert "backbone.text.encoder.embeddings.word_embeddings.weight" in model.state_dict()
    assert list(model.state_dict()) == list(reference.state_dict())
    steps = []
    for stage in (model, reference):
        torch.manual_seed(3)  # the same dropout draws in both
        steps.append(one_step(stage))
        grad = stage.backbone.text.encoder.get_input_embeddings().weight.grad
        assert grad is not None and not grad.is_sparse and grad.abs().sum() > 0
    for name, value in steps[1].items():
        torch.testing.assert_close(steps[0][name], value, rtol=1e-6, atol=1e-7, msg=name)
    # After training the keys are still the plain table's, and a fresh model loads them strictly (a checkpoint).
    assert list(model.state_dict()) == list(reference.state_dict())
    tiny(lr=1e-3).load_state_dict(model.state_dict(), strict=True)


def test_a_copied_row_grad_table_hooks_its_own_weight() -> None:
    table = RowGradEmbedding(20, 4)
    ids = torch.tensor([[1, 2, 2, 5]])
    table(ids).sum().backward()
    copied = copy.deepcopy(table)  # what an EMA teacher or a checkpoint copy does
    copied.weight.grad = None
    (copied(ids) * 2).sum().backward()
    assert not copied.weight.grad.is_sparse and copied.weight.grad[2].tolist() == [4.0] * 4
    assert copied.weight.grad.data_ptr() != table.weight.grad.data_ptr()  # its own dense tensor
    assert table.weight.grad[2].tolist() == [2.0] * 4  # the original's gradient untouched
    assert list(copied.state_dict()) == ["weight"]


def test_nan_guard_names_the_first_bad_term() -> None:
    model = tiny()
    model.check_finite({"mim": torch.tensor(0.5), "itm": torch.tensor(1.0)})  # all finite: nothing
    terms = {"mim": torch.tensor(0.5), "mlm": torch.tensor(float("inf")), "itm": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match=r"loss term 'mlm' is inf at global step 0"):
        model.check_finite(terms)


def test_step_benchmark_runs_both_stages_and_the_comparison(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results.json"
    command = [sys.executable, str(REPO / "benchmarks" / "step.py"), "--presets", "tiny", "--repeats", "1"]
    command += ["--warmup", "1", "--batch", "2", "--length", "8", "--json", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert result["kernel"] == "fused" and result["flops"] > 0 and 0 < result["mfu"] < 1
    assert result["saved_for_backward_mib"] > 0 and "saved for backward" in done.stdout
    assert set(result["parts"]) == {"forward + losses", "backward", "AdamW", "EMA"}
    assert "MFU" in done.stdout and "teacher pass (forward alone)" in done.stdout
    command += ["--stage", "finetune", "--compare", str(REPO / "src"), "--rounds", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GM-Coord" in done.stdout and "after / before:" in done.stdout
    assert len(json.loads(out.read_text())) == 2


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.py`` is the script a lent GPU runs once: its ``--dry-run`` (every part on the CPU,
    `tiny` and brief, the compiled row included) must get through before device time is spent on it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--text-model", "minilm", "--dry-run"]
    command += ["--vqa-rad", str(REPO / "tests" / "data" / "vqa_rad"), "--out", str(tmp_path), "--epochs", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["step_times"]
    assert [(r["precision"], r["options"]) for r in rows] == [
        ("fp32", {}), ("bf16", {}), ("bf16", {"gradient_checkpointing": True}), ("fp32", {}), ("bf16", {}),
        ("bf16", {"compile": True}),
    ]  # fmt: skip
    assert all(r["preset"] == "tiny" and r["flops"] > 0 and r["saved_for_backward_mib"] > 0 for r in rows)
    assert "saved GiB" in done.stdout
    assert report["bf16_fit"]["finite"] and report["bf16_fit"]["steps"] == 3
    plain, gm = report["vqa_rad"]
    assert not plain["gm_coord"] and gm["gm_coord"] and "k_t_range" in gm and plain["n"] == gm["n"] > 0
    assert "[vqa-rad] plain_seed0" in done.stdout and "[vqa-rad] gm_seed0" in done.stdout
