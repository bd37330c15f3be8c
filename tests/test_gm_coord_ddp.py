"""GM-Coord under real 2-process DDP (CPU, gloo): ranks see different data, yet end with identical weights.

This needs the summed scores (same coefficients on every rank) and the seeded noise (same noise on every
rank); a rank-local score or a rank-local RNG would make the replicas drift apart after the first step.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from pipeline_helpers import ddp_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from umd_lightning.callbacks.gm_coord import GMCoord, GMCoordInputs, scores, unimodal_logits

D, CLASSES, STEPS = 8, 4, 5


class TwoTowerModule(pl.LightningModule):
    """Minimal GMCoordModule; at the end each rank saves its weights and records to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.text_tower, self.image_tower = nn.Linear(12, D), nn.Linear(10, D)
        self.head = nn.Sequential(nn.Linear(2 * D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, CLASSES))
        self.gm_coord_inputs: GMCoordInputs | None = None
        self.record: dict[str, list] = {"local_s_t": [], "global_s_t": [], "k_t": [], "k_v": [], "noise": []}

    def gm_coord_modalities(self) -> dict[str, list[nn.Module]]:
        return {"text": [self.text_tower], "image": [self.image_tower]}

    def gm_coord_head(self) -> nn.Module:
        return self.head

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        text, image, target = batch
        h_t, h_v = torch.tanh(self.text_tower(text)), torch.tanh(self.image_tower(image))
        self.gm_coord_inputs = self._inputs = GMCoordInputs(h_t.detach(), h_v.detach(), target)
        return nn.functional.cross_entropy(self.head(torch.cat([h_t, h_v], -1)), target)

    def on_after_backward(self) -> None:
        # DDP has all-reduced the gradients by now; GM-Coord has not touched them yet.
        self._grad_before = self.text_tower.weight.grad.clone()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        gm = next(cb for cb in self.trainer.callbacks if isinstance(cb, GMCoord))
        z_t, _ = unimodal_logits(self.head, self._inputs.text, self._inputs.image, "reference")
        self.record["local_s_t"].append(scores(z_t, self._inputs.target).item())
        self.record["global_s_t"].append(gm.last_stats["s_t"])
        self.record["k_t"].append(gm.last_stats["k_t"])
        self.record["k_v"].append(gm.last_stats["k_v"])
        self.record["noise"].append(self.text_tower.weight.grad - gm.last_stats["k_t"] * self._grad_before)

    def on_train_end(self) -> None:
        params = {name: p.detach().clone() for name, p in self.named_parameters()}
        torch.save({"params": params, **self.record}, Path(self.out_dir) / f"rank{self.global_rank}.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # GM-Coord's noise seed; the spawned ranks inherit it
    torch.manual_seed(0)
    n = 2 * 2 * STEPS  # 2 ranks x batch 2 x steps; the distributed sampler gives each rank its own half
    data = TensorDataset(torch.randn(n, 12), torch.randn(n, 10), torch.randint(0, CLASSES, (n,)))
    trainer = ddp_trainer(max_steps=STEPS, callbacks=[GMCoord(alpha=0.5, noise=True)])
    trainer.fit(TwoTowerModule(str(tmp_path)), DataLoader(data, batch_size=2, shuffle=False))

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(rank0["k_t"]) == STEPS
    for name, param in rank0["params"].items():
        assert torch.equal(param, rank1["params"][name]), name
    # The ranks scored different data, and both used the sum over ranks.
    assert rank0["local_s_t"] != rank1["local_s_t"]
    for step in range(STEPS):
        total = rank0["local_s_t"][step] + rank1["local_s_t"][step]
        assert rank0["global_s_t"][step] == rank1["global_s_t"][step] == pytest.approx(total, rel=1e-5)
    assert rank0["k_t"] == rank1["k_t"] and rank0["k_v"] == rank1["k_v"]
    assert min(rank0["k_t"] + rank0["k_v"]) < 0.95  # modulation happened
    # Noise was added, is the same on both ranks, and differs from step to step.
    for noise0, noise1 in zip(rank0["noise"], rank1["noise"]):
        assert noise0.abs().max() > 0 and torch.equal(noise0, noise1)
    assert not torch.equal(rank0["noise"][0], rank0["noise"][1])
