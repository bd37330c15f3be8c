"""The medicat layout (see the package docstring for its files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _save_png, _write_text
from umd_lightning.data.synthetic.render import render, render_chart
from umd_lightning.data.synthetic.scene import random_scene
from umd_lightning.data.synthetic.text import caption


def _write_medicat(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    release = root / "release"
    lines = []
    pdf_hash, figure = "", 0
    for index in range(n):
        if index == 0 or rng.random() < 0.5:
            pdf_hash, figure = rng.bytes(20).hex(), 0
        figure += 1
        fig_uri = f"{int(rng.integers(1, 12))}-Figure{figure}-1.png"
        radiology = index % 4 != 3
        if radiology:
            scene = random_scene(rng)
            image = render(scene, size, rng).convert("RGB")
            text = f"Figure {figure}. {caption(scene, rng)}"
            lesion = scene.lesions[0]
            mentions = [
                f"The {scene.organ} {scene.modality} (Figure {figure}) showed {lesion.phrase()}.",
                f"Figure {figure} shows {len(scene.lesions)} lesion{'s' if len(scene.lesions) > 1 else ''}.",
            ]
        else:
            image, bars, tallest = render_chart(size, rng)
            text = f"Figure {figure}. Bar chart of {bars} groups; group {tallest} has the tallest bar."
            mentions = [
                f"Group {tallest} scored highest of the {bars} groups (Figure {figure}).",
                "see above",
            ]
        _save_png(image, release / "figures" / f"{pdf_hash}_{fig_uri}")
        references = None
        if index % 5 != 4:
            references = mentions[: 1 + index % 2]
            if index % 3 == 0:
                references.append(f"(Figure {figure})")  # under 3 words: not a usable text
        record = {
            "pdf_hash": pdf_hash,
            "fig_uri": fig_uri,
            "s2_caption": text,
            "s2orc_references": references,
            "radiology": radiology,
        }
        lines.append(json.dumps(record))
    _write_text(release / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl", lines)
