"""``generate`` and the command: determinism, argument checks, the CLI, and committed fixtures that equal a fresh run
of ``tests/data/make_fixtures.py`` (``data/synthetic/generate.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_helpers import (
    FIXTURES,
    gray,
    tree,
)

from umd_lightning.data.synthetic import LAYOUTS, OUTPUT_FOLDERS, generate, main


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", n_images=6, image_size=24, seed=5)
    second = generate(tmp_path / "b", n_images=6, image_size=24, seed=5)
    other = generate(tmp_path / "c", layouts=["roco"], n_images=6, image_size=24, seed=6)
    assert list(first) == [name for layout in LAYOUTS for name in OUTPUT_FOLDERS[layout]]
    for name in first:
        assert tree(first[name]) == tree(second[name]), name
    assert tree(first["roco"]) != tree(other["roco"])


def test_a_layout_does_not_depend_on_the_others_written(tmp_path: Path) -> None:
    alone = generate(tmp_path / "alone", layouts=["slake"], n_images=6, image_size=24, seed=1)
    together = generate(tmp_path / "all", layouts=["roco", "slake"], n_images=6, image_size=24, seed=1)
    assert tree(alone["slake"]) == tree(together["slake"])


def test_refuses_bad_arguments_and_occupied_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown layout"):
        generate(tmp_path, layouts=["roco", "chexpert"])
    with pytest.raises(ValueError, match="at least 6"):
        generate(tmp_path, n_images=5)
    generate(tmp_path, layouts=["jsonl"], n_images=6, image_size=16)
    with pytest.raises(FileExistsError, match="jsonl"):
        generate(tmp_path, layouts=["jsonl"], n_images=6, image_size=16, seed=1)
    generate(tmp_path, layouts=["jsonl"], n_images=7, image_size=16, overwrite=True)
    assert len((tmp_path / "jsonl" / "data.jsonl").read_text().splitlines()) == 7


def test_committed_fixtures_equal_a_fresh_run(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.make_fixtures(tmp_path)
    for name, root in fresh.items():
        committed, regenerated = tree(FIXTURES / name), tree(root)
        assert sorted(committed) == sorted(regenerated), f"{name}: file list differs; run make_fixtures.py"
        for relative, data in regenerated.items():
            if committed[relative] == data:
                continue
            # An image may differ by encoder rounding on another platform; its pixels must not.
            assert relative.endswith((".jpg", ".png")), f"{name}/{relative} differs; run make_fixtures.py"
            difference = np.abs(gray(FIXTURES / name / relative) - gray(root / relative)).max()
            assert difference <= 2, f"{name}/{relative} pixels differ by {difference}"
    total = sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file())
    assert total < 1_000_000


def test_cli_writes_the_named_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path), "--layouts", "vqa_rad,melinda", "--images", "6", "--size", "16", "--seed", "3"])
    printed = capsys.readouterr().out
    assert printed.splitlines() == [
        f"vqa_rad: {tmp_path / 'vqa_rad'}",
        f"vqa_rad_preprocessed: {tmp_path / 'vqa_rad_preprocessed'}",
        f"melinda: {tmp_path / 'melinda'}",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["melinda", "vqa_rad", "vqa_rad_preprocessed"]
    with Image.open(next((tmp_path / "melinda" / "melinda_images").iterdir())) as image:
        assert image.size == (16, 16)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--layouts", "melinda", "--images", "6"])  # occupied, no --overwrite
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main([str(tmp_path / "new"), "--layouts", "nope"])
