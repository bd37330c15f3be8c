"""Write the committed test fixtures: every synthetic layout, 12 images of 32 px each, seed 2024.

Run from the repository root: ``python tests/data/make_fixtures.py`` (or ``--out DIR`` to write elsewhere).
It replaces the layout folders next to this file; ``tests/data_tests/synthetic/test_generate.py`` checks that
the committed files equal a fresh run, so change the generator and then re-run this script in the same commit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from umd_lightning.data.synthetic import LAYOUTS, generate

HERE = Path(__file__).resolve().parent
N_IMAGES = 12
IMAGE_SIZE = 32
SEED = 2024


def make_fixtures(out: Path = HERE) -> dict[str, Path]:
    """Write all layouts under ``out`` (replacing their folders) and return each folder's path."""
    return generate(out, LAYOUTS, n_images=N_IMAGES, image_size=IMAGE_SIZE, seed=SEED, overwrite=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: next to this script)")
    for name, root in make_fixtures(parser.parse_args().out).items():
        print(f"{name}: {root}")
