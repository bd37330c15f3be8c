"""The melinda layout (see the package docstring for its files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _save_jpeg, _split_names, _write_csv
from umd_lightning.data.synthetic.render import render
from umd_lightning.data.synthetic.scene import SHAPES, random_scene

_MELINDA_METHODS = {"CT": "computed tomography", "MRI": "magnetic resonance imaging"}

_MELINDA_SHAPES = {"circle": "round", "square": "square", "triangle": "triangular"}


def _write_melinda(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    splits = _split_names(n, ("train", "dev", "test"))
    pmc_ids = 1_000_000 + rng.choice(9_000_000, size=n, replace=False)
    rows: dict[str, list[list[str]]] = {"train": [], "dev": [], "test": []}
    for index, (pmc_id, split) in enumerate(zip(pmc_ids, splits)):
        # Cycling the shape puts every class in the training split (it holds at least 4 of the first images).
        scene = random_scene(rng, max_lesions=1, shape=SHAPES[index % len(SHAPES)])
        lesion = scene.lesions[0]
        figure = int(rng.integers(1, 8))
        figure_file = f"PMC{pmc_id}_F{figure}.jpg"
        _save_jpeg(render(scene, size, rng).convert("RGB"), root / "melinda_images" / figure_file)
        adjective = _MELINDA_SHAPES[lesion.shape]
        text = (
            f"Figure {figure}. {scene.plane.capitalize()} {_MELINDA_METHODS[scene.modality]} "
            f"of the {scene.organ}, showing a {lesion.intensity} {adjective} lesion "
            f'in the {lesion.region} ("arrow").'
        )
        rows[split].append(
            [
                figure_file,
                text,
                _MELINDA_METHODS[scene.modality],
                f"{adjective} lesion",
                scene.modality,
                lesion.shape,
            ]
        )
    header = ["figure_file", "caption", "i_meth", "p_meth", "i_meth_label", "p_meth_label"]
    for split, split_rows in rows.items():
        _write_csv(root / f"{split}.csv", header, split_rows)
