"""The README's main job, wired end to end on the tiny preset (`python -m umd_lightning.demo --smoke`)."""

import re

import pytest

from umd_lightning import demo


@pytest.mark.slow
def test_demo_chain_runs_and_prints_the_test_table(tmp_path, capsys):
    demo.main(["--out", str(tmp_path), "--images", "60", "--smoke"])
    printed = capsys.readouterr().out
    for stage in ("pretrain", "calib", "finetune"):
        assert re.search(rf"\[demo\] {stage}: 3 steps", printed), printed
    assert re.search(r"acc\s+\|\s+[\d.]+%\s+\|\s+[\d.]+%\s+\|\s+[\d.]+%", printed)
    assert "tiny preset" in printed and "no leak" in printed
    assert (tmp_path / "pretrain.ckpt").is_file() and (tmp_path / "calib.ckpt").is_file()
