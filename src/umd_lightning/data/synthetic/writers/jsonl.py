"""The jsonl layout (see the package docstring for its files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _save_jpeg, _save_png, _split_names, _write_text
from umd_lightning.data.synthetic.render import render
from umd_lightning.data.synthetic.scene import random_scene
from umd_lightning.data.synthetic.text import caption


def _write_jsonl(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    lines = []
    for index, split in enumerate(_split_names(n, ("train", "val", "test"))):
        scene = random_scene(rng)
        image = render(scene, size, rng)
        if index % 5 == 4:
            relative = f"images/img_{index:04d}.png"
            _save_png(image.convert("RGB"), root / relative)
        else:
            relative = f"images/img_{index:04d}.jpg"
            _save_jpeg(image, root / relative)
        text: str | list[str] = caption(scene, rng)
        if index % 3 == 2:
            count = len(scene.lesions)
            text = [text, f"{scene.modality} {scene.organ}, {count} lesion{'s' if count > 1 else ''}."]
        lines.append(json.dumps({"image": relative, "text": text, "split": split}))
    _write_text(root / "data.jsonl", lines)
