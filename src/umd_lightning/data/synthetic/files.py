"""Deterministic file writing shared by the layout writers: seeded streams, splits, images, text, JSON, CSV."""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

_JPEG_QUALITY = 90


def _rng(seed: int, layout: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(layout.encode())])


def _split_sizes(n: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[int]:
    """Split ``n`` items by ``fractions``; each split but the first gets at least one, the first the rest."""
    rest = [max(1, int(n * fraction)) for fraction in fractions[1:]]
    return [n - sum(rest), *rest]


def _split_names(n: int, names: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[str]:
    """The split name of each of ``n`` consecutive items."""
    return [name for name, count in zip(names, _split_sizes(n, fractions)) for _ in range(count)]


def _save_jpeg(image: Image.Image, *paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG", quality=_JPEG_QUALITY)


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _write_text(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8", newline="\n")


def _write_json(path: Path, data: object, *, indent: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _hex_id(rng: np.random.Generator, groups: Sequence[int]) -> str:
    """Dash-separated random hex groups of the given lengths (UUID-like or MIMIC ``dicom_id``-like)."""
    return "-".join(rng.bytes((length + 1) // 2).hex()[:length] for length in groups)
