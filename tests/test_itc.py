"""The optional image-text contrastive (ITC) head and top-k retrieval evaluation: the InfoNCE value by hand, the
caption keys, the head's hand-off, top-k re-scoring against exhaustive scoring, top-k keeping a true pair that
hand-made ITC features rank within k, the set-up errors, the DDP gather's gradients, a tiny fit + test through the
shipped retrieval config, and the benchmark script on tiny."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from pipeline_helpers import ddp_trainer, quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from umd_lightning import losses
from umd_lightning.data import RetrievalDataModule
from umd_lightning.data.synthetic import generate
from umd_lightning.errors import ConfigError
from umd_lightning.stages import FineTune, MRPretrain, StageError, TDCalib
from umd_lightning.stages.itc import gather_with_grad
from umd_lightning.stages.tasks.retrieval import top_k_mask

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the loss
def test_itc_loss_is_infonce_both_ways_by_hand() -> None:
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    keys = torch.tensor([10, 20])
    # cosines: image0.text0 = 0.8, image0.text1 = 0, image1.text0 = 0.96, image1.text1 = 0.8
    i2t = (-math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(0.0)))
           - math.log(math.exp(1.6) / (math.exp(1.92) + math.exp(1.6)))) / 2  # fmt: skip
    t2i = (-math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(1.92)))
           - math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6)))) / 2  # fmt: skip
    loss = losses.itc_loss(image, text, scale, keys)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_itc_loss_treats_a_shared_caption_as_a_positive_not_a_negative() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(1.0)
    same = losses.itc_loss(image, text, scale, torch.tensor([5, 5]))
    # Both texts are positives of both images: target (1/2, 1/2) over logits (1, 0) in every row.
    log_softmax = [1 - math.log(math.e + 1), -math.log(math.e + 1)]
    assert same.item() == pytest.approx(-(log_softmax[0] + log_softmax[1]) / 2, rel=1e-6)
    distinct = losses.itc_loss(image, text, scale, torch.tensor([5, 6]))
    assert distinct.item() == pytest.approx(-log_softmax[0], rel=1e-6)


def test_itc_loss_against_gathered_candidates_equals_the_full_batch_for_local_rows() -> None:
    torch.manual_seed(0)
    image = nn.functional.normalize(torch.randn(5, 4), dim=-1)
    text = nn.functional.normalize(torch.randn(5, 4), dim=-1)
    keys = torch.arange(5)
    scale = torch.tensor(3.0)
    full = losses.itc_loss(image, text, scale, keys)
    # Two "processes" holding rows 0-2 and 3-4, each scoring against all rows: the mean of their losses,
    # weighted by rows, is the full batch's loss.
    part = [
        losses.itc_loss(image[s], text[s], scale, keys[s], all_image=image, all_text=text, all_keys=keys)
        for s in (slice(0, 3), slice(3, 5))
    ]
    assert ((3 * part[0] + 2 * part[1]) / 5).item() == pytest.approx(full.item(), rel=1e-6)


def test_caption_keys_ignore_padding_and_tell_captions_apart() -> None:
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 7, 8, 102, 0], [101, 8, 7, 102, 0], [101, 7, 8, 9, 102]])
    mask = (ids != 0).long()
    keys = losses.caption_keys(ids, mask)
    shorter = losses.caption_keys(ids[:1, :4], mask[:1, :4])
    assert keys[0] == keys[1] == shorter[0]
    assert len({int(keys[0]), int(keys[2]), int(keys[3])}) == 3


# ------------------------------------------------------------------------------------------------ the head
def test_itc_head_features_are_unit_vectors_and_text_ignores_padding() -> None:
    model = FineTune(preset="tiny", text_model="minilm", task="retrieval", itc_weight=1.0, itc_dim=16)
    head = model.itc_head
    torch.manual_seed(0)
    image = head.image_features(torch.randn(3, 5, 32))
    tokens = torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    text = head.text_features(tokens, mask)
    assert image.shape == (3, 16) and text.shape == (2, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text[0], head.text_features(tokens[:1, :2], mask[:1, :2])[0])
    assert head.scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        head.log_scale.fill_(10.0)
    assert head.scale.item() == pytest.approx(100.0, rel=1e-5)


def test_itc_head_is_off_by_default_and_hands_over_from_pretraining(tmp_path: Path) -> None:
    assert MRPretrain(preset="tiny", text_model="minilm").itc_head is None
    assert FineTune(preset="tiny", text_model="minilm", task="retrieval").itc_head is None
    torch.manual_seed(0)
    pretrained = MRPretrain(preset="tiny", text_model="minilm", itc_weight=0.5)
    path = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": pretrained.state_dict(), "umd_stage": "pretrain"}, path)
    tuned = FineTune(preset="tiny", text_model="minilm", task="retrieval", itc_weight=0.1)
    tuned.load_pretrained(path)
    for key, value in pretrained.itc_head.state_dict().items():
        torch.testing.assert_close(tuned.itc_head.state_dict()[key], value, msg=key)
    # A checkpoint without one (the default pre-training) leaves the head fresh, and TD-Calib with ITC continues
    # the pre-trained head.
    plain = tmp_path / "plain.ckpt"
    torch.save(
        {"state_dict": MRPretrain(preset="tiny", text_model="minilm").state_dict(), "umd_stage": "pretrain"}, plain
    )
    with pytest.warns(UserWarning, match="has no itc_head: it starts from a fresh initialisation"):
        FineTune(preset="tiny", text_model="minilm", task="retrieval", itc_weight=0.1).load_pretrained(plain)
    calib = TDCalib(preset="tiny", text_model="minilm", itc_weight=0.1)
    calib.load_pretrained(path)
    torch.testing.assert_close(calib.itc_head.text_proj.weight, pretrained.itc_head.text_proj.weight)


def test_pretraining_adds_the_weighted_itc_term() -> None:
    torch.manual_seed(0)
    model = MRPretrain(preset="tiny", text_model="minilm", itc_weight=0.5)
    batch = {
        "pixel_values": torch.randn(3, 3, 32, 32),
        "input_ids": torch.tensor([[101, 5, 6, 102], [101, 7, 8, 102], [101, 9, 10, 102]]),
        "attention_mask": torch.ones(3, 4, dtype=torch.long),
        "mlm_input_ids": torch.tensor([[101, 103, 6, 102], [101, 7, 103, 102], [101, 9, 10, 102]]),
        "mlm_labels": torch.tensor([[-100, 5, -100, -100], [-100, -100, 8, -100], [-100] * 4]),
    }
    terms, metrics = model.reconstruction_losses(batch, torch.Generator().manual_seed(0))
    assert terms["itc"] > 0 and metrics["itc_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    hp = model.hparams
    others = sum(hp.alpha * terms[name] for name in ("mim", "mlm", "feamim", "feamlm")) + hp.w_itm * terms["itm"]
    torch.testing.assert_close(terms["loss"], others + 0.5 * terms["itc"])
    terms["loss"].backward()
    assert model.itc_head.log_scale.grad is not None and model.backbone.vision.vit.pos_embed.grad is not None


# ------------------------------------------------------------------------------------------------ set-up errors
def test_topk_without_an_itc_head_and_itc_outside_retrieval_are_refused() -> None:
    with pytest.raises(StageError, match=r"retrieval_eval=topk ranks the pairs with an ITC head.*itc_weight > 0"):
        FineTune(preset="tiny", text_model="minilm", task="retrieval", retrieval_eval="topk")
    with pytest.raises(StageError, match=r"itc_weight=0\.1 applies to retrieval fine-tuning only"):
        FineTune(preset="tiny", text_model="minilm", task="vqa", num_outputs=3, itc_weight=0.1)
    with pytest.raises(ConfigError, match="retrieval_top_k=0 is outside"):
        FineTune(preset="tiny", text_model="minilm", task="retrieval", itc_weight=0.1, retrieval_top_k=0)
    with pytest.raises(StageError, match="retrieval_eval must be 'exhaustive' or 'topk'"):
        FineTune(preset="tiny", text_model="minilm", task="retrieval", retrieval_eval="approximate")


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def synthetic_roco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic ROCO: 60 images; the val and test splits keep 8 pairs each (captions under 3 words are dropped)."""
    return generate(tmp_path_factory.mktemp("synthetic"), layouts=["roco"], n_images=60, image_size=32)["roco"]


def retrieval_data(root: Path) -> RetrievalDataModule:
    return RetrievalDataModule(
        dataset="roco", root=str(root), tokenizer="minilm", image_size=32, batch_size=4, num_workers=0, scan="none"
    )


def test_topk_with_k_at_least_the_captions_equals_exhaustive(synthetic_roco: Path) -> None:
    pl.seed_everything(0)
    data = retrieval_data(synthetic_roco)
    # A small text_chunk: several fusion chunks per image, and pairs of different images sharing one in top-k.
    model = FineTune(preset="tiny", text_model="minilm", lr=1e-3, itc_weight=0.5, text_chunk=4)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, datamodule=data)
    task = model.task_impl
    results, matrices = {}, {}
    kept: list[tuple[Tensor, Tensor | None]] = []
    score_images = task.score_images
    task.score_images = lambda module, batch: kept.append(score_images(module, batch)) or kept[-1]
    for mode, k in (("exhaustive", 32), ("topk", 8), ("topk", 1000)):
        model.hparams.retrieval_eval, model.hparams.retrieval_top_k = mode, k
        kept.clear()
        results[mode, k] = trainer.test(model, datamodule=data, verbose=False)[0]
        matrices[mode, k] = [torch.cat([rows[d] for rows in kept]) for d in (0, 1) if kept[0][d] is not None]
        assert model.evaluation_protocol()["pairs_cross_encoded"] == 64
    assert model.evaluation_protocol() == {
        "retrieval_eval": "topk",
        "retrieval_top_k": 1000,
        "ranked_by": "ITC cosine, top-k re-scored",
        "pairs": 64,
        "pairs_cross_encoded": 64,
    }
    assert results["topk", 8] == results["exhaustive", 32] == results["topk", 1000]
    (exhaustive,) = matrices["exhaustive", 32]
    assert exhaustive.shape == (8, 8) and torch.isfinite(exhaustive).all()
    for i2t_or_t2i in matrices["topk", 8]:
        torch.testing.assert_close(i2t_or_t2i, exhaustive, rtol=1e-5, atol=1e-5)
    # The cached caption embeddings give the scores of a plain forward pass of each pair.
    split = data.eval_split("test")
    _, ids, mask = data.eval_captions("test")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([split.images[i]["image"] for i in range(2)])
        for i in range(2):
            direct = model(pixels[i : i + 1].expand(8, -1, -1, -1), ids.unsqueeze(1), mask.unsqueeze(1))
            torch.testing.assert_close(direct[:, 0], exhaustive[i], rtol=1e-5, atol=1e-5)


def test_topk_keeps_the_true_pair_that_hand_made_itc_features_rank_within_k() -> None:
    torch.manual_seed(0)
    model = FineTune(preset="tiny", text_model="minilm", task="retrieval", itc_weight=1.0, text_chunk=3)
    model.hparams.retrieval_eval, model.hparams.retrieval_top_k = "topk", 2
    model._trainer = SimpleNamespace(world_size=1)  # what the evaluation reads of a trainer
    model.eval()
    n, length = 6, 5
    # Hand-made unit features: caption j leans more towards image j+1 than towards its own image j, so every image
    # ranks its own caption second (after caption i-1's) and every caption its own image second: top-1 would miss
    # every true pair, top-2 keeps them all.
    basis = torch.eye(n)
    text_features = nn.functional.normalize(0.9 * basis + basis.roll(1, dims=1), dim=-1)
    image_features = basis
    similarity = image_features @ text_features.T
    assert (similarity.argmax(dim=1) != torch.arange(n)).all() and (similarity.argmax(dim=0) != torch.arange(n)).all()
    i2t_mask, t2i_mask = top_k_mask(similarity, 2, dim=1), top_k_mask(similarity, 2, dim=0)
    assert i2t_mask.diagonal().all() and t2i_mask.diagonal().all()
    assert (i2t_mask.sum(dim=1) == 2).all() and (t2i_mask.sum(dim=0) == 2).all()

    task = model.task_impl
    ids = torch.randint(1000, 2000, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    task.text = (ids, mask)
    task.split = SimpleNamespace(
        captions=[f"caption {j}" for j in range(n)], image_captions=[f"caption {j}" for j in range(n)]
    )
    with torch.no_grad():
        task.text_tokens = model.backbone.embed_text(ids, mask)
    task.text_features, task.t2i_candidates = text_features, t2i_mask
    order = iter([image_features[:4], image_features[4:]])
    model.itc_head.image_features = lambda tokens: next(order)
    task.scores = []
    for rows in (slice(0, 4), slice(4, 6)):
        count = rows.stop - rows.start
        batch = {"pixel_values": torch.randn(count, 3, 32, 32), "image_index": torch.arange(rows.start, rows.stop)}
        i2t, t2i = task.score_images(model, batch)
        assert torch.equal(torch.isfinite(i2t), i2t_mask[rows]) and torch.equal(torch.isfinite(t2i), t2i_mask[rows])
    results = task.evaluation_results(model, "test")
    # Whatever the (random) cross-encoder says, the true pair is one of two finite scores in its row / column.
    assert results["test/i2t_r5"] == results["test/t2i_r5"] == 1.0
    assert task.last_evaluation == {"pairs": 36, "pairs_cross_encoded": int((i2t_mask | t2i_mask).sum())}


def test_retrieval_predictions_under_topk_list_the_re_scored_captions(synthetic_roco: Path) -> None:
    pl.seed_everything(0)
    data = retrieval_data(synthetic_roco)
    model = FineTune(preset="tiny", text_model="minilm", itc_weight=0.5, retrieval_eval="topk", retrieval_top_k=3)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    rows = [row for batch in trainer.predict(model, datamodule=data) for row in batch]
    assert len(rows) == 8 and all(len(row["top10"]) == 3 for row in rows)


# ------------------------------------------------------------------------------------------------ DDP
ROWS = {0: 3, 1: 2}  # rows per rank: uneven, so the gather pads


class GatherProbe(pl.LightningModule):
    """One step of the ITC loss over features gathered from 2 processes with different batch sizes; saves each
    rank's sample indices and its gradients (after DDP's averaging) to ``out_dir/rank<r>.pt``."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        torch.manual_seed(0)
        self.image_proj, self.text_proj = nn.Linear(4, 3), nn.Linear(4, 3)
        self.kept: Tensor | None = None

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        image, text, keys, index = (part[: ROWS[self.global_rank]] for part in batch)
        self.kept = index
        image = nn.functional.normalize(self.image_proj(image), dim=-1)
        text = nn.functional.normalize(self.text_proj(text), dim=-1)
        return losses.itc_loss(
            image,
            text,
            torch.tensor(5.0),
            keys,
            all_image=gather_with_grad(self, image),
            all_text=gather_with_grad(self, text),
            all_keys=gather_with_grad(self, keys),
        )

    def on_after_backward(self) -> None:
        grads = {name: p.grad.clone() for name, p in self.named_parameters()}
        torch.save({"kept": self.kept, "grads": grads}, Path(self.out_dir) / f"rank{self.global_rank}.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_ddp_gather_gives_the_full_batch_gradient(tmp_path: Path) -> None:
    torch.manual_seed(1)
    # Samples 2 and 4 share a caption (key 2): positives of each other wherever the ranks put them.
    keys = torch.tensor([0, 1, 2, 3, 2, 5])
    data = TensorDataset(torch.randn(6, 4), torch.randn(6, 4), keys, torch.arange(6))
    trainer = ddp_trainer(max_steps=1)
    trainer.fit(GatherProbe(str(tmp_path)), DataLoader(data, batch_size=3, shuffle=False))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(rank0["kept"]) == 3 and len(rank1["kept"]) == 2

    # The same loss on one process over the 5 rows the ranks kept, in rank order: DDP averages the ranks'
    # gradients, and each rank's loss is a mean over its own rows against all 5.
    image, text, _, _ = data.tensors
    kept = torch.cat([rank0["kept"], rank1["kept"]])
    probe = GatherProbe(str(tmp_path))
    all_image = nn.functional.normalize(probe.image_proj(image[kept]), dim=-1)
    all_text = nn.functional.normalize(probe.text_proj(text[kept]), dim=-1)
    scale, all_keys = torch.tensor(5.0), keys[kept]
    parts = (slice(0, 3), slice(3, 5))
    total = sum(
        losses.itc_loss(all_image[p], all_text[p], scale, all_keys[p], all_image, all_text, all_keys) for p in parts
    )
    (total / 2).backward()
    for name, param in probe.named_parameters():
        torch.testing.assert_close(rank0["grads"][name], param.grad, msg=name)
        torch.testing.assert_close(rank1["grads"][name], param.grad, msg=name)


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.slow
def test_tiny_fit_and_test_with_itc_and_topk_through_the_shipped_config(synthetic_roco: Path, tmp_path: Path) -> None:
    from test_pipeline import cpu_overrides, umd

    config = REPO / "configs" / "finetune" / "roco.yaml"
    args = cpu_overrides(config, ["--data.init_args.root", str(synthetic_roco)], batch_size=4)
    args += ["--model.init_args.pretrained", "null", "--data.init_args.scan", "none"]
    args += ["--model.init_args.itc_weight", "0.5", "--model.init_args.retrieval_eval", "topk"]
    args += ["--model.init_args.retrieval_top_k", "4"]
    umd(tmp_path, "fit", *args)
    out = umd(tmp_path, "test", *args, "--ckpt_path", "best")
    assert "pairs scored by: ITC cosine, the top 4 re-scored by the cross-encoder (retrieval_eval: topk)" in out.stdout
    results = json.loads((tmp_path / "runs" / "finetune" / "roco" / "test_results.json").read_text())
    protocol = results["evaluation_protocol"]
    assert protocol["retrieval_eval"] == "topk" and protocol["retrieval_top_k"] == 4 and protocol["pairs"] == 64
    assert 32 <= protocol["pairs_cross_encoded"] <= 64  # each image's 4 captions and each caption's 4 images
    assert {"test/i2t_r1", "test/t2i_r10", "test/rsum"} <= results["metrics"].keys()


# ------------------------------------------------------------------------------------------------ the benchmark
def test_retrieval_eval_benchmark_runs_on_tiny(synthetic_roco: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("retrieval_eval", REPO / "benchmarks" / "retrieval_eval.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    options = ["--dataset", "roco", "--root", str(synthetic_roco), "--pairs", "8,40", "--ks", "1,100"]
    options += ["--repeats", "1", "--steps", "2", "--batch-size", "4", "--num-candidates", "4"]
    options += ["--checkpoint", str(tmp_path / "model.ckpt")]
    rows = benchmark.main(options)
    protocols = (("exhaustive", None), ("topk", 1), ("topk", 100), ("itc only", None))
    assert [(row["pairs"], row["mode"], row["k"]) for row in rows] == [
        (size, mode, k) for size in (8, 40) for mode, k in protocols
    ]
    for size, (exhaustive, top1, top100, itc) in ((8, rows[:4]), (40, rows[4:])):
        assert exhaustive["fused"] == top100["fused"] == size * size and top100["max_delta"] == 0.0
        assert top100["delta_range"] == (0.0, 0.0) and exhaustive["delta_range"] == (0.0, 0.0)
        low, high = top1["delta_range"]
        assert low <= high and max(-low, high) == top1["max_delta"]
        assert size <= top1["fused"] <= 2 * size and itc["fused"] == 0
        # Top-1 keeps only the ITC's best candidate in each direction: its R@1 is the ITC's own.
        assert top1["recall"][0] == itc["recall"][0] and top1["recall"][3] == itc["recall"][3]
    assert rows[0]["source"] == "test split" and rows[4]["source"].startswith("all splits (")
    # A second run loads the saved model instead of training.
    again = benchmark.main([*options[:-4], "--pairs", "8", "--ks", "100", "--checkpoint", str(tmp_path / "model.ckpt")])
    assert again[0]["recall"] == rows[0]["recall"]
