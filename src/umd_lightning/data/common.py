"""What every loader shares: safe paths, image decoding to RGB, texts, the ``on_error`` policy (the set-up scan
that applies it is ``scan.py``).

The rules (DATA.md, end): annotation paths stay inside the data root; a missing or undecodable image or an empty
text is a data error; ``on_error="raise"`` (default) fails at set-up naming file, record and reason, and
``on_error="skip"`` drops the record and counts it by kind.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import unicodedata
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import get_worker_info

from umd_lightning.errors import DataError

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
"""The splits every DataModule builds and ``umd data check`` scans."""
OnError = Literal["raise", "skip"]


def safe_join(root: str | Path, relative: Any, *, file: str | Path, record: str | int | None) -> Path:
    """Join an annotation's relative path under ``root``, refusing anything that would leave it.

    Raises:
        DataError: the path is not a non-empty string, is absolute, or escapes the root (``..``).
    """
    if not isinstance(relative, str) or not relative.strip():
        raise DataError("bad_path", file, record, f"image path must be a non-empty string, got {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")):
        raise DataError("unsafe_path", file, record, f"absolute image path {relative!r} is not allowed")
    try:
        root = Path(root).resolve()
        joined = (root / rel).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system, a symlink loop
        raise DataError("bad_path", file, record, f"image path {relative[:200]!r} is not usable: {exc}") from exc
    if joined != root and root not in joined.parents:
        raise DataError("unsafe_path", file, record, f"image path {relative!r} leaves the data root {root}")
    return joined


NON_FINITE_INFO = "umd_non_finite_pixels"
"""Key of ``Image.info`` where :func:`to_rgb` leaves the number of NaN / infinite pixels of a float image."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image (grayscale, 16-bit, float, RGBA, LA, palette, CMYK) to 8-bit RGB.

    16-bit, 32-bit integer and float images are rescaled by the range of their finite values (min-max); NaN and
    -inf pixels become black, +inf white, and their number is left in ``info["umd_non_finite_pixels"]`` of the
    result (0 when there are none). Transparent pixels are placed on black.
    """
    non_finite = 0
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(array)
        non_finite = int(array.size - np.count_nonzero(finite))
        values = array[finite]
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        scaled[np.isnan(array) | np.isneginf(array)] = 0.0
        scaled[np.isposinf(array)] = 255.0
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = image.convert("RGB")
    rgb.info[NON_FINITE_INFO] = non_finite
    return rgb


@contextlib.contextmanager
def _truncated_images_fail() -> Iterator[None]:
    """PIL's ``LOAD_TRUNCATED_IMAGES`` off while one file is opened (a truncated file is a ``bad_image``, whatever
    another library set globally), and the caller's value back afterwards."""
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open_image(path: Path, where: str | Path, record: str | int | None, decode: bool) -> Image.Image | None:
    """Open ``path`` and either decode it to RGB (``decode``) or only verify its header; every failure becomes a
    ``DataError`` of kind ``missing_image``, ``bad_image`` or ``image_too_large``."""
    if not path.is_file():
        raise DataError("missing_image", where, record, f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError("bad_image", where, record, f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings(), _truncated_images_fail():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if not decode:
                    image.verify()
                    return None
                image.load()
                # Pixels as the file is displayed: a camera's or scanner's EXIF Orientation is applied.
                return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError("image_too_large", where, record, f"{path}: {exc}") from exc
    except Exception as exc:  # PIL's decoders raise OSError and SyntaxError, and on fuzzed files almost anything
        verb = "decode" if decode else "read"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError("bad_image", where, record, f"cannot {verb} {path}: {reason}") from exc


def load_image(path: str | Path, *, file: str | Path | None = None, record: str | int | None = None) -> Image.Image:
    """Decode an image file fully and return it as RGB.

    Raises:
        DataError: the file is missing, empty, not an image, truncated, or larger than PIL's
            decompression-bomb limit.
    """
    path = Path(path)
    return _open_image(path, file if file is not None else path, record, decode=True)


class RuntimeSkips:
    """Samples dropped after the set-up scan (their image stopped decoding), counted exactly across DataLoader
    worker processes: each process adds to its own slot of a tensor in shared memory, so no two writers share a
    counter.

    Args:
        slots: worker slots (worker ``i`` uses slot ``1 + i % slots``; the main process slot 0).
    """

    def __init__(self, slots: int = 64) -> None:
        self._counts = torch.zeros(slots + 1, dtype=torch.int64).share_memory_()
        self._slots = slots

    def add(self) -> None:
        worker = get_worker_info()
        self._counts[0 if worker is None else 1 + worker.id % self._slots] += 1

    @property
    def total(self) -> int:
        """Samples dropped so far, all processes together."""
        return int(self._counts.sum())


def load_scanned_image(
    path: str | Path,
    *,
    on_error: OnError,
    record: str | int | None,
    file: str | Path | None = None,
    skips: RuntimeSkips | None = None,
) -> Image.Image | None:
    """Decode an image that passed the set-up scan, for ``__getitem__``: if it no longer decodes (the file changed
    since), raise under ``on_error="raise"``, else log it, count it in ``skips`` and return ``None`` for the
    collate to drop.

    Raises:
        DataError: the image no longer decodes and ``on_error == "raise"``.
    """
    try:
        return load_image(path, file=file, record=record)
    except DataError as error:
        if on_error == "raise":
            raise
        if skips is not None:
            skips.add()
        log.warning("skipping a sample whose image stopped decoding after the scan: %s", error)
        return None


def check_image_header(path: str | Path, *, file: str | Path | None = None, record: str | int | None = None) -> None:
    """Open an image without decoding its pixels (cheap scan).

    Raises:
        DataError: missing, empty or unidentifiable file, or a header that declares more pixels than PIL's
            decompression-bomb limit.
    """
    path = Path(path)
    _open_image(path, file if file is not None else path, record, decode=False)


_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})
"""Unicode categories that draw nothing on their own: controls, format characters (zero-width space and joiners,
byte-order marks, direction marks), separators and combining marks."""


def is_visible(text: str) -> bool:
    """Whether ``text`` has at least one character that shows (not only spaces, zero-width or control ones)."""
    return any(unicodedata.category(character) not in _INVISIBLE_CATEGORIES for character in text)


def check_text(text: Any, *, file: str | Path, record: str | int | None, what: str = "text") -> str:
    """Return ``text`` stripped, or raise when it is not a string with at least one visible character (a text of
    zero-width spaces is empty).

    Raises:
        DataError: kind ``empty_text``.
    """
    if not isinstance(text, str) or not is_visible(text):
        raise DataError("empty_text", file, record, f"{what} must be a non-empty string, got {text!r}")
    return text.strip()


def describe_bad_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """Where and what the first invalid UTF-8 byte of ``data`` is, and what to do, in one line."""
    line = data.count(b"\n", 0, error.start) + 1
    found = data[error.start : error.end].hex(" ")
    return f"not valid UTF-8 at byte {error.start} (line {line}: 0x{found}, {error.reason}); re-save the file as UTF-8"


def decode_utf8(data: bytes, *, file: str | Path, record: str | int | None = None) -> str:
    """``data`` decoded as UTF-8, a leading byte-order mark dropped.

    Raises:
        DataError: kind ``bad_encoding``, naming the file and the byte offset.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError("bad_encoding", file, record, describe_bad_utf8(data, exc)) from exc


def read_text(path: str | Path, *, record: str | int | None = None) -> str:
    """The whole text of an annotation file (``.gz`` files are decompressed), as UTF-8 with or without a BOM.

    Raises:
        DataError: ``bad_encoding`` (invalid UTF-8, with the byte offset) or ``bad_annotation`` (unreadable or
            broken ``.gz`` file), naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError("bad_annotation", path, record, f"cannot read the file: {exc}") from exc
    return decode_utf8(data, file=path, record=record)


def check_label_column(dataset: str, label_column: str, valid: Sequence[str]) -> None:
    if label_column not in valid:
        raise ValueError(f"{dataset}: unknown label column {label_column!r}; valid columns are {list(valid)}")
