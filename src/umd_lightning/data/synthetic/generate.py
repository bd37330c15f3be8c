"""``generate`` (every layout, or some, under one folder) and the ``umd-synthetic`` command."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from umd_lightning.data.synthetic.files import _rng
from umd_lightning.data.synthetic.writers.jsonl import _write_jsonl
from umd_lightning.data.synthetic.writers.medicat import _write_medicat
from umd_lightning.data.synthetic.writers.melinda import _write_melinda
from umd_lightning.data.synthetic.writers.mimic_cxr import _write_mimic_cxr
from umd_lightning.data.synthetic.writers.roco import _write_roco
from umd_lightning.data.synthetic.writers.slake import _write_slake
from umd_lightning.data.synthetic.writers.vqa_med_2019 import _write_vqa_med_2019
from umd_lightning.data.synthetic.writers.vqa_rad import _write_vqa_rad

LAYOUTS = ("roco", "medicat", "mimic_cxr", "vqa_rad", "slake", "melinda", "vqa_med_2019", "jsonl")
"""Names accepted by ``generate(layouts=...)``."""

OUTPUT_FOLDERS = {
    "roco": ("roco",),
    "medicat": ("medicat",),
    "mimic_cxr": ("mimic_cxr",),
    "vqa_rad": ("vqa_rad", "vqa_rad_preprocessed"),
    "slake": ("slake",),
    "melinda": ("melinda",),
    "vqa_med_2019": ("vqa_med_2019", "vqa_med_2019_m3ae"),
    "jsonl": ("jsonl",),
}
"""The folders (under ``out``) each layout writes; also the keys of ``generate``'s result."""

MIN_IMAGES = 6
"""Smallest ``n_images``: three non-empty splits, and a MELINDA training split holding all three shapes."""

_WRITERS = {
    "roco": _write_roco,
    "medicat": _write_medicat,
    "mimic_cxr": _write_mimic_cxr,
    "vqa_rad": _write_vqa_rad,
    "slake": _write_slake,
    "melinda": _write_melinda,
    "vqa_med_2019": _write_vqa_med_2019,
    "jsonl": _write_jsonl,
}


def generate(
    out: str | Path,
    layouts: Sequence[str] = LAYOUTS,
    n_images: int = 200,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write synthetic data sets under ``out``, one folder per layout (see the package docstring).

    Args:
        out: the parent folder; created if missing.
        layouts: which of ``LAYOUTS`` to write.
        n_images: images per layout (at least ``MIN_IMAGES``).
        image_size: side of the square images in pixels (at least 16).
        seed: the only source of randomness.
        overwrite: replace a layout folder that exists and is not empty, instead of refusing.

    Returns:
        Each written folder name (``OUTPUT_FOLDERS``) mapped to its path, the root a loader is given.

    Raises:
        ValueError: an unknown layout or a too small ``n_images``/``image_size``.
        FileExistsError: a layout folder holds files and ``overwrite`` is false (nothing is written then).
    """
    out = Path(out)
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    if n_images < MIN_IMAGES:
        raise ValueError(f"n_images must be at least {MIN_IMAGES} (three splits per layout), got {n_images}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels (lesions would vanish), got {image_size}")
    layouts = list(dict.fromkeys(layouts))
    folders = {layout: [out / name for name in OUTPUT_FOLDERS[layout]] for layout in layouts}
    occupied = [path for paths in folders.values() for path in paths if path.is_dir() and any(path.iterdir())]
    if occupied and not overwrite:
        raise FileExistsError(f"not empty: {[str(p) for p in occupied]}; pass overwrite=True (--overwrite)")
    for path in occupied:
        shutil.rmtree(path)
    roots: dict[str, Path] = {}
    for layout in layouts:
        _WRITERS[layout](*folders[layout], n_images, image_size, _rng(seed, layout))
        roots.update({path.name: path for path in folders[layout]})
    return roots


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``umd-synthetic OUT [--layouts a,b] [--images N] [--size PX] [--seed S] [--overwrite]``.

    Prints each written folder. ``python -m umd_lightning.data.synthetic`` runs the same."""
    parser = argparse.ArgumentParser(
        prog="umd-synthetic",
        description="Write seeded synthetic medical image-text data sets in their publishers' file layouts.",
    )
    parser.add_argument("out", type=Path, help="parent folder; one sub-folder per layout is written")
    parser.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help=f"comma-separated subset of {','.join(LAYOUTS)} (default: all)",
    )
    parser.add_argument("--images", type=int, default=200, help="images per layout (default: 200)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing non-empty layout folders")
    args = parser.parse_args(argv)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    try:
        roots = generate(args.out, layouts, args.images, args.size, args.seed, args.overwrite)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    for name, root in roots.items():
        print(f"{name}: {root}")
