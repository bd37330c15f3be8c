"""The roco layout (see the package docstring for its files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _save_jpeg, _split_sizes, _write_text
from umd_lightning.data.synthetic.render import render
from umd_lightning.data.synthetic.scene import random_scene
from umd_lightning.data.synthetic.text import caption


def _write_roco(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    number = 0
    for split, count in zip(("train", "validation", "test"), _split_sizes(n)):
        folder = root / split / "radiology"
        captions, keywords = [], []
        for _ in range(count):
            number += 1
            roco_id = f"ROCO_{number:05d}"
            scene = random_scene(rng)
            _save_jpeg(render(scene, size, rng), folder / "images" / f"{roco_id}.jpg")
            if number % 8 == 0:
                text = f"{scene.modality} {scene.organ}"  # under 3 words: loaders must drop it
            else:
                text = caption(scene, rng)
                if number % 3 == 0:
                    text = text.replace(" ", "  ", 2) + " "  # stray spaces, as in the release
            captions.append(f"{roco_id}\t {text}")
            words = [scene.modality.lower(), scene.organ, *(lesion.shape for lesion in scene.lesions)]
            keywords.append(f"{roco_id}\t" + "\t".join(words))
        _write_text(folder / "captions.txt", captions)
        _write_text(folder / "keywords.txt", keywords)
