"""Packs: pre-training pairs written once, pre-resized, into litdata shards (``umd data pack``, ``data/pack.py``), and
read back as a map-style dataset (:class:`PackedPairs`) by :class:`~umd_lightning.data.PackedPretrainDataModule`.

A pack is a folder::

    DIR/manifest.json          what was packed: format, source config, image size, encoding, versions, counts
    DIR/<split>/index.json     litdata's index of the split's chunks (train, val, test)
    DIR/<split>/chunk-*.bin    the chunks: one item per (image, text) pair, {"id", "text", "image", "channels"}

``image`` holds the image after the deterministic part of the split's transform
(:func:`~umd_lightning.data.transforms.fixed_geometry`: training images resized to a square, evaluation images
resized by the shorter side and centre-cropped), as ``uint8`` pixels encoded losslessly (``png``, the default, or
``raw``) or as JPEG (``jpeg``, lossy). An image whose three channels are equal (most radiology) is stored with one
channel, which is lossless too. The random crop, the scaling to [0, 1] and the normalisation still run at load time,
so a lossless pack gives the same tensors as the raw files, bit for bit, and the normalisation can still change.

The items are read by index (litdata's ``StreamingDataset.__getitem__``) through the DataModules' own sampler and
loader, not in litdata's chunk order: the order, the split across ranks, the mid-epoch resume and the per-step
seeding are then those of the raw path (``data/sampler.py``), so a run on a pack repeats a run on the raw files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from torchvision.io import decode_jpeg, decode_png, encode_jpeg, encode_png

from umd_lightning.data.datasets import Sample, Transform
from umd_lightning.errors import ConfigError

PACK_FORMAT = "umd_lightning.pack/1"
"""The ``format`` of the manifests this version writes and reads."""
MANIFEST = "manifest.json"
Encoding = Literal["png", "raw", "jpeg"]
ENCODINGS: tuple[Encoding, ...] = ("png", "raw", "jpeg")
GEOMETRY = {True: "resize_to_square", False: "resize_shorter_side_centre_crop"}
"""The manifest's name of each split's fixed geometry (training: True)."""


def import_litdata() -> ModuleType:
    """litdata, imported with its PyPI version check off (it would query the network at every dataset and write).

    Raises:
        ConfigError: litdata is not installed (the ``pack`` extra).
    """
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    try:
        import litdata
    except ImportError:
        raise ConfigError(
            "packs are written and read with litdata, which is not installed: pip install 'umd_lightning[pack]'"
        ) from None
    return litdata


def encode_image(image: torch.Tensor, encoding: Encoding, jpeg_quality: int = 95) -> tuple[bytes, int]:
    """``uint8 (3, H, W)`` pixels as the bytes a pack stores, and the channels stored (1 when all three are equal).

    Raises:
        ValueError: not a ``uint8 (3, H, W)`` tensor, or an unknown encoding.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"a packed image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
    grey = bool(torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]))
    pixels = (image[:1] if grey else image).contiguous()
    if encoding == "png":
        data = encode_png(pixels)
    elif encoding == "jpeg":
        data = encode_jpeg(pixels, quality=jpeg_quality)
    elif encoding == "raw":
        return pixels.numpy().tobytes(), pixels.shape[0]
    else:
        raise ValueError(f"unknown pack encoding {encoding!r}: choose one of {list(ENCODINGS)}")
    return data.numpy().tobytes(), pixels.shape[0]


def decode_image(data: bytes | memoryview, encoding: Encoding, channels: int, size: int) -> torch.Tensor:
    """The inverse of :func:`encode_image`: ``uint8 (3, size, size)`` pixels (a one-channel image repeated)."""
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if encoding == "raw":
        pixels = buffer.view(channels, size, size)
    elif encoding == "png":
        pixels = decode_png(buffer)
    else:
        pixels = decode_jpeg(buffer)
    return pixels.expand(3, -1, -1).contiguous() if pixels.shape[0] == 1 else pixels


@dataclass
class PackSplit:
    """One split of a pack, as its manifest describes it.

    Attributes:
        source_split: the split name the sources were read with (``val`` maps to each format's own name).
        geometry: the fixed geometry applied (see ``GEOMETRY``).
        records: images written.
        pairs: items written (one per text of each image).
        bytes: size of the split's chunk files.
        grey_records: images stored with one channel.
        read: annotation records the sources read.
        skipped: records left out, by kind: the sources' scan (data errors and filters) and the images that did
            not decode when packed (``on_error: skip``).
        examples: the first messages of each skipped kind.
    """

    source_split: str
    geometry: str
    records: int = 0
    pairs: int = 0
    bytes: int = 0
    grey_records: int = 0
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Manifest:
    """``DIR/manifest.json``: what a pack holds and how it was made (written last, so a pack with one is complete).

    Attributes:
        format: ``PACK_FORMAT``.
        image_size: side of the stored squares.
        encoding: ``png``, ``raw`` or ``jpeg``.
        jpeg_quality: the JPEG quality (``jpeg`` only).
        splits: each split's :class:`PackSplit`.
        source_config: the YAML the pack was made from.
        data: that config's ``data`` section with the command's overrides, as packed.
        versions: umd_lightning, litdata, torch, torchvision and pillow at packing time.
    """

    format: str
    image_size: int
    encoding: Encoding
    jpeg_quality: int | None
    splits: dict[str, PackSplit]
    source_config: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: Path) -> Manifest:
        try:
            splits = {name: PackSplit(**split) for name, split in raw["splits"].items()}
            return cls(**{**raw, "splits": splits})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{where} is not a valid pack manifest ({exc}): re-run umd data pack") from exc

    def split(self, name: str, root: str | Path) -> PackSplit:
        """The split ``name``.

        Raises:
            ConfigError: the pack has no such split (the message lists those it has).
        """
        if name not in self.splits:
            raise ConfigError(
                f"the pack {root} has no {name} split (it holds {', '.join(self.splits) or 'none'}): "
                f"re-pack with umd data pack --split including {name}"
            )
        return self.splits[name]


def open_pack(root: str | Path) -> Manifest:
    """Read and check a pack: its manifest, and for every split litdata's index and every chunk file it lists,
    present with the size the index records (a copy cut short is found here, not mid-epoch).

    Raises:
        ConfigError: not a pack, an interrupted one, another format version, or a missing or truncated file; the
            message names the file and what to do.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"pack folder {root} does not exist: write it with umd data pack --config ... --out {root}")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(
            f"{root} is not a complete pack (no {MANIFEST}; umd data pack writes it last): "
            f"write it with umd data pack --config ... --out {root}"
        )
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {manifest_path}: {exc}; re-run umd data pack") from exc
    if not isinstance(raw, dict) or raw.get("format") != PACK_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ConfigError(
            f"{manifest_path} has format {found!r}, this version reads {PACK_FORMAT!r}: re-pack with this version"
        )
    manifest = Manifest.from_dict(raw, manifest_path)
    for name, split in manifest.splits.items():
        if split.pairs:  # a split left empty by its sources has no folder
            _check_split_files(root / name, split)
    return manifest


def _check_split_files(folder: Path, split: PackSplit) -> None:
    index_path = folder / "index.json"
    try:
        chunks = json.loads(index_path.read_text(encoding="utf-8"))["chunks"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the pack index {index_path} ({exc}): re-run umd data pack") from exc
    items = 0
    for chunk in chunks:
        path = folder / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "is missing" if size is None else f"has {size} bytes, the index says {chunk['chunk_bytes']}"
            raise ConfigError(f"pack chunk {path} {found}: copy the pack again or re-run umd data pack")
        items += chunk["chunk_size"]
    if items != split.pairs:
        raise ConfigError(f"{index_path} lists {items} items, the manifest {split.pairs}: re-run umd data pack")


class PackedPairs(Dataset):
    """One split of a pack as pre-training samples ``{"image": transform(uint8 (3, S, S)), "text": str, "id": str}``,
    in the order the raw dataset of the same sources gives them.

    Each process opens its own litdata ``StreamingDataset`` on the split's folder (lazily, so DataLoader workers
    never share the parent's open chunk files) and reads items by index.

    Args:
        root: the pack folder.
        split: ``train``, ``val`` or ``test``.
        transform: applied to the ``uint8 (3, S, S)`` image (``image_transform`` of the split).
        manifest: the pack's manifest when already read (:func:`open_pack`).
    """

    def __init__(
        self, root: str | Path, split: str, transform: Transform | None = None, manifest: Manifest | None = None
    ) -> None:
        self.root = Path(root)
        self.manifest = manifest or open_pack(self.root)
        self.info = self.manifest.split(split, self.root)
        self.split = split
        self.transform = transform
        self._items: Any = None
        self._owner: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_items"], state["_owner"] = None, None
        return state

    def _open(self) -> Any:
        if self._items is None or self._owner != os.getpid():
            self._items = import_litdata().StreamingDataset(str(self.root / self.split))
            self._owner = os.getpid()
        return self._items

    def __len__(self) -> int:
        return self.info.pairs

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for the {len(self)} pairs of {self.root / self.split}")
        item = self._open()[index]
        size = self.manifest.image_size
        image = decode_image(item["image"], self.manifest.encoding, int(item["channels"]), size)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "text": item["text"], "id": item["id"]}

    def summary(self) -> str:
        """One line: the split, its pairs and images, and how the pack was made."""
        skipped = ", ".join(f"{kind} {n}" for kind, n in sorted(self.info.skipped.items())) or "none"
        return (
            f"packed {self.split}: {self.info.pairs} pairs of {self.info.records} images from {self.root} "
            f"({self.manifest.image_size} px, {self.manifest.encoding}; left out when packed: {skipped})"
        )
