"""MedMNIST: one ``.npz`` file of images and labels, with a fixed text prompt (DATA.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umd_lightning.data.common import (
    DataError,
)
from umd_lightning.data.records import Record

MEDMNIST_PROMPTS = {"pneumoniamnist": "a chest x-ray", "breastmnist": "a breast ultrasound image"}


def medmnist_prompt(path: str | Path) -> str:
    """The fixed text input for a MedMNIST file, chosen by its name (``a medical image`` when unknown)."""
    return MEDMNIST_PROMPTS.get(Path(path).stem.lower(), "a medical image")


def medmnist_records(path: str | Path, *, prompt: str | None = None) -> list[Record]:
    """A MedMNIST ``.npz`` file (``{train,val,test}_images`` N x H x W (x 1 or 3) uint8, ``*_labels``), image only.

    Args:
        path: the ``.npz`` file.
        prompt: the fixed text paired with every image; ``None`` picks one from the file name
            (:func:`medmnist_prompt`).

    Raises:
        FileNotFoundError: no such file.
        DataError: (a ``ValueError``) the file is not a readable ``.npz`` archive, an array is missing (named) or
            has the wrong type or shape, or the labels are multi-label (not supported); the file is named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"medmnist: {path} is not a file; expected a MedMNIST .npz such as pneumoniamnist.npz")
    text = prompt if prompt is not None else medmnist_prompt(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy and zipfile raise many kinds (ValueError, OSError, BadZipFile, EOFError)
        raise DataError("bad_annotation", path, None, f"not a readable .npz archive: {str(exc)[:200]}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError("bad_annotation", path, None, "holds a single array, expected a MedMNIST .npz archive")
    records: list[Record] = []
    with archive as arrays:
        for split in ("train", "val", "test"):
            missing = [key for key in (f"{split}_images", f"{split}_labels") if key not in arrays.files]
            if missing:
                raise DataError("missing_array", path, None, f"missing array(s) {missing}; the file has {arrays.files}")
            try:
                images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            except Exception as exc:  # a member cut short or refused (object arrays need pickle)
                raise DataError("bad_annotation", path, split, f"cannot read its arrays: {str(exc)[:200]}") from exc
            channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
            channels_ok = channels_ok and min(images.shape[1:3]) > 0
            if images.dtype != np.uint8 or not channels_ok:
                raise DataError(
                    "bad_annotation",
                    path,
                    split,
                    f"{split}_images is {images.dtype} {images.shape}, expected uint8 N x H x W (x 1 or 3)",
                )
            if not np.issubdtype(labels.dtype, np.integer) or labels.ndim == 0 or len(labels) != len(images):
                raise DataError(
                    "bad_annotation",
                    path,
                    split,
                    f"{split}_labels is {labels.dtype} {labels.shape}, expected {len(images)} integer labels",
                )
            labels = labels.reshape(len(labels), -1)
            if labels.shape[1] != 1:
                raise DataError(
                    "bad_annotation",
                    path,
                    split,
                    f"{split}_labels has {labels.shape[1]} columns; multi-label is not supported",
                )
            if images.ndim == 4 and images.shape[-1] == 1:
                images = images[..., 0]
            records += [
                Record(
                    id=f"{split}/{i}",
                    image=images[i],
                    texts=(text,),
                    label_name=str(int(labels[i, 0])),
                    split=split,
                )
                for i in range(len(images))
            ]
    return records
