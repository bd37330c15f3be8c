"""Write the corpus of bad inputs: small data sets in the publishers' layouts, each holding broken records.

Run ``.venv/bin/python tests/data/bad/make_bad_inputs.py`` (seed 7) to rewrite the corpus beside this script;
``--out DIR`` writes it elsewhere (``tests/test_bad_inputs.py`` checks that a fresh run equals the committed
files). Every image is a 32 x 32 px synthetic "scan"; nothing here is real data. ``README.md`` lists every bad
input, the record that holds it and the behaviour the loaders must show.

The decompression bomb (``bomb.png``) is a 66-byte PNG whose header declares 60,000 x 60,000 pixels and whose
pixel data is never written: PIL refuses it when it opens the header, so nothing huge is committed and no test
has to lower ``Image.MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 7
SIZE = 32
LAYOUTS = ("vqa_rad", "vqa_rad_not_a_list", "roco", "melinda", "melinda_missing_column", "jsonl")
BOMB_SIDE = 60_000
"""Side of the bomb's declared size: 3.6e9 pixels, over twice PIL's default limit (89.5 million)."""


def scan_array(rng: np.random.Generator) -> np.ndarray:
    """A dark 32 x 32 uint8 "scan" with one bright disc at a random place."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx = rng.integers(8, SIZE - 8, size=2)
    radius = int(rng.integers(4, 8))
    image = rng.integers(0, 40, size=(SIZE, SIZE)).astype(np.uint8)
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 220
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def good_jpeg(rng: np.random.Generator) -> bytes:
    """An ordinary RGB JPEG."""
    gray = scan_array(rng)
    return jpeg_bytes(Image.fromarray(np.stack([gray, gray, gray // 2], axis=-1)))


def grayscale_jpeg(rng: np.random.Generator) -> bytes:
    """A single-channel (mode ``L``) JPEG."""
    return jpeg_bytes(Image.fromarray(scan_array(rng)))


def cmyk_jpeg(rng: np.random.Generator) -> bytes:
    """A four-channel CMYK JPEG: cyan ink on the left half, the scan's disc in light black ink."""
    black = scan_array(rng) // 4
    cyan = np.zeros((SIZE, SIZE), np.uint8)
    cyan[:, : SIZE // 2] = 255
    zeros = np.zeros((SIZE, SIZE), np.uint8)
    return jpeg_bytes(Image.fromarray(np.stack([cyan, zeros, zeros, black], axis=-1), mode="CMYK"))


def gray16_png(rng: np.random.Generator) -> bytes:
    """A 16-bit grayscale PNG (mode ``I;16``) using 1,000 to 61,000 of the 0..65,535 range: top-left pixel
    1,000 (the minimum), bottom-right 61,000 (the maximum)."""
    values = (scan_array(rng).astype(np.uint32) * 200 + 5_000).clip(1_000, 61_000)
    values[0, 0], values[-1, -1] = 1_000, 61_000
    return png_bytes(Image.fromarray(values.astype(np.uint16)))


def palette_alpha_png(rng: np.random.Generator) -> bytes:
    """A palette (mode ``P``) PNG with a transparent colour: index 0 (transparent, white in the palette) fills
    the top-left 8 x 8 corner, index 1 (opaque red) the rest, the scan's disc in index 2 (opaque green)."""
    disc = scan_array(rng) > 200
    indices = np.ones((SIZE, SIZE), np.uint8)
    indices[disc] = 2
    indices[:8, :8] = 0
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 255, 255, 255, 0, 0, 0, 255, 0] + [0, 0, 0] * 253)
    return png_bytes(image, transparency=0)


def truncated_jpeg(rng: np.random.Generator) -> bytes:
    """A good JPEG without its last 300 bytes: the header opens, the pixel data stops early."""
    data = good_jpeg(rng)
    return data[:-300]


def zero_bytes(rng: np.random.Generator) -> bytes:
    """An empty file with an image name."""
    return b""


def bomb_png(rng: np.random.Generator) -> bytes:
    """A PNG header declaring ``BOMB_SIDE`` x ``BOMB_SIDE`` 8-bit grayscale pixels, then one tiny IDAT chunk
    and IEND (see the module docstring)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


Maker = Callable[[np.random.Generator], bytes]


def write_images(folder: Path, images: dict[str, Maker], rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in images.items():
        (folder / name).write_bytes(make(rng))


def vqa_rad_entry(qid: str, image: object, question: object, answer: object, answer_type: str, test: bool) -> dict:
    return {
        "qid": qid,
        "image_name": image,
        "image_organ": "CHEST",
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "question_type": "PRES",
        "phrase_type": "test_freeform" if test else "freeform",
    }


def write_vqa_rad(out: Path, rng: np.random.Generator) -> None:
    """VQA-RAD, official layout: every bad image and bad annotation as one training question each."""
    root = out / "vqa_rad"
    write_images(
        root / "VQA_RAD Image Folder",
        {
            "synpic100.jpg": good_jpeg,
            "synpic101.jpg": good_jpeg,
            "synpic102.jpg": good_jpeg,
            "synpic103.jpg": good_jpeg,
            "synpic104.jpg": good_jpeg,
            "grayscale.jpg": grayscale_jpeg,
            "gray16.png": gray16_png,
            "cmyk.jpg": cmyk_jpeg,
            "palette_alpha.png": palette_alpha_png,
            "truncated.jpg": truncated_jpeg,
            "zero_bytes.jpg": zero_bytes,
            "bomb.png": bomb_png,
        },
        rng,
    )
    # A real file just outside the image folder: "../outside.jpg" must be refused even though it exists.
    (root / "outside.jpg").write_bytes(good_jpeg(rng))
    train = [
        ("good_yes", "synpic100.jpg", "is there a bright disc?", "Yes", "CLOSED"),
        ("good_no", "synpic101.jpg", "is there a fracture?", "no", "CLOSED "),
        ("good_open", "synpic102.jpg", "what organ is shown?", "lung", "OPEN"),
        ("none_answer", "synpic102.jpg", "what abnormality is seen?", "None", "OPEN"),
        ("grayscale", "grayscale.jpg", "is there a bright disc?", "yes", "CLOSED"),
        ("gray16", "gray16.png", "is this a ct?", "no", "CLOSED"),
        ("cmyk", "cmyk.jpg", "is there a bright disc?", "yes", "CLOSED"),
        ("palette_alpha", "palette_alpha.png", "what organ is shown?", "lung", "OPEN"),
        ("truncated_jpeg", "truncated.jpg", "is there a bright disc?", "yes", "CLOSED"),
        ("zero_byte_file", "zero_bytes.jpg", "is there a bright disc?", "yes", "CLOSED"),
        ("decompression_bomb", "bomb.png", "is there a bright disc?", "no", "CLOSED"),
        ("missing_image", "synpic999.jpg", "is there a bright disc?", "yes", "CLOSED"),
        ("dotdot_path", "../outside.jpg", "is there a bright disc?", "yes", "CLOSED"),
        ("absolute_path", "/etc/passwd", "is there a bright disc?", "yes", "CLOSED"),
        ("empty_question", "synpic100.jpg", "   ", "yes", "CLOSED"),
        ("nonstring_question", "synpic101.jpg", 42, "no", "CLOSED"),
    ]
    test = [
        ("test_good", "synpic103.jpg", "is there a bright disc?", "yes", "CLOSED"),
        ("test_none_answer", "synpic104.jpg", "what abnormality is seen?", "None", "OPEN"),
        ("test_out_of_vocabulary", "synpic104.jpg", "what organ is shown?", "left kidney", "OPEN"),
    ]
    entries = [vqa_rad_entry(*row, test=False) for row in train] + [vqa_rad_entry(*row, test=True) for row in test]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")

    # The same file name holding one object instead of a list of records.
    other = out / "vqa_rad_not_a_list"
    other.mkdir(parents=True, exist_ok=True)
    record = vqa_rad_entry("not_a_list", "synpic100.jpg", "is there a bright disc?", "yes", "CLOSED", test=False)
    (other / "VQA_RAD Dataset Public.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def write_roco(out: Path, rng: np.random.Generator) -> None:
    """ROCO radiology subset: bad captions, images and one escaping id in the training split."""
    root = out / "roco"
    lines = {
        "train": [
            "ROCO_00001\tComputed tomography of the chest showing a round lesion.",
            "ROCO_00002\tAxial  MRI of the\tbrain   with a bright spot.",
            "ROCO_00003\tPlain radiograph of the hand stored as CMYK.",
            "ROCO_00004\tChest x-ray",
            "ROCO_00005\t   ",
            "ROCO_00006\tAbdominal CT whose file was cut short.",
            "ROCO_00007\tPelvic radiograph stored as an empty file.",
            "ROCO_00008\tKnee MRI whose image file is missing.",
            "../../../../outside\tA caption whose image path leaves the data root.",
            "ROCO_00009 no tab separates the id from this caption",
        ],
        "validation": [
            "ROCO_00011\tSagittal MRI of the lumbar spine.",
            "ROCO_00012\tUltrasound of the liver with a cyst.",
        ],
        "test": [
            "ROCO_00013\tCoronal CT of the sinuses without findings.",
            "ROCO_00014\tFrontal chest radiograph with a nodule.",
        ],
    }
    images = {
        "train": {
            "ROCO_00001.jpg": good_jpeg,
            "ROCO_00002.jpg": grayscale_jpeg,
            "ROCO_00003.jpg": cmyk_jpeg,
            "ROCO_00004.jpg": good_jpeg,
            "ROCO_00005.jpg": good_jpeg,
            "ROCO_00006.jpg": truncated_jpeg,
            "ROCO_00007.jpg": zero_bytes,
        },
        "validation": {"ROCO_00011.jpg": good_jpeg, "ROCO_00012.jpg": good_jpeg},
        "test": {"ROCO_00013.jpg": good_jpeg, "ROCO_00014.jpg": good_jpeg},
    }
    for split, split_lines in lines.items():
        folder = root / split / "radiology"
        write_images(folder / "images", images[split], rng)
        (folder / "captions.txt").write_text("\n".join(split_lines) + "\n", encoding="utf-8")


MELINDA_COLUMNS = ["figure_file", "caption", "i_meth", "p_meth", "i_meth_label", "p_meth_label"]


def write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows([{column: row.get(column, "") for column in columns} for row in rows])


def melinda_row(figure: str, caption: str, label: str) -> dict[str, str]:
    return {
        "figure_file": figure,
        "caption": caption,
        "i_meth": "CT",
        "p_meth": label.lower(),
        "i_meth_label": "CT",
        "p_meth_label": label,
    }


def write_melinda(out: Path, rng: np.random.Generator) -> None:
    """MELINDA: bad rows in ``train.csv``; a second copy whose ``train.csv`` lacks the ``caption`` column."""
    root = out / "melinda"
    write_images(
        root / "melinda_images",
        {
            "PMC1_F1.jpg": good_jpeg,
            "PMC2_F1.jpg": good_jpeg,
            "PMC3_F1.png": gray16_png,
            "PMC4_F1.jpg": good_jpeg,
            "PMC6_F1.jpg": truncated_jpeg,
            "PMC7_F1.jpg": good_jpeg,
            "PMC8_F1.jpg": good_jpeg,
            "PMC9_F1.jpg": good_jpeg,
        },
        rng,
    )
    train = [
        melinda_row("PMC1_F1.jpg", "Western blot of the protein.", "Blot"),
        melinda_row("PMC2_F1.jpg", "Confocal micrograph of stained cells.", "Microscopy"),
        melinda_row("PMC3_F1.png", "A sixteen-bit grayscale figure.", "Microscopy"),
        melinda_row("PMC4_F1.jpg", "", "Blot"),
        melinda_row("/etc/passwd", "A figure named by an absolute path.", "Blot"),
        melinda_row("../train.csv", "A figure path that leaves the image folder.", "Blot"),
        melinda_row("PMC5_F1.jpg", "A figure whose file is missing.", "Blot"),
        melinda_row("PMC6_F1.jpg", "A figure whose file was cut short.", "Microscopy"),
        melinda_row("PMC7_F1.jpg", "A figure without a label.", ""),
    ]
    write_csv(root / "train.csv", MELINDA_COLUMNS, train)
    write_csv(root / "dev.csv", MELINDA_COLUMNS, [melinda_row("PMC8_F1.jpg", "A blot on the dev split.", "Blot")])
    write_csv(
        root / "test.csv", MELINDA_COLUMNS, [melinda_row("PMC9_F1.jpg", "Cells on the test split.", "Microscopy")]
    )

    other = out / "melinda_missing_column"
    other.mkdir(parents=True, exist_ok=True)
    without_caption = [column for column in MELINDA_COLUMNS if column != "caption"]
    write_csv(other / "train.csv", without_caption, train[:2])
    write_csv(other / "dev.csv", MELINDA_COLUMNS, [melinda_row("PMC8_F1.jpg", "A blot on the dev split.", "Blot")])
    write_csv(
        other / "test.csv", MELINDA_COLUMNS, [melinda_row("PMC9_F1.jpg", "Cells on the test split.", "Microscopy")]
    )


def write_jsonl(out: Path, rng: np.random.Generator) -> None:
    """Generic JSONL: convertible PNGs, non-string and empty texts, an absolute path, a bomb, a broken line."""
    root = out / "jsonl"
    write_images(
        root / "images",
        {"palette_alpha.png": palette_alpha_png, "gray16.png": gray16_png, "bomb.png": bomb_png},
        rng,
    )
    train = [
        {"id": "palette_alpha", "image": "images/palette_alpha.png", "text": "A palette image with a clear corner."},
        {"id": "gray16", "image": "images/gray16.png", "text": ["A sixteen-bit grayscale scan.", "Second caption."]},
        {"id": "absolute_path", "image": "/etc/passwd", "text": "An absolute image path is refused."},
        {"id": "nonstring_text", "image": "images/gray16.png", "text": 7},
        {"id": "empty_text", "image": "images/gray16.png", "text": ""},
        {"id": "decompression_bomb", "image": "images/bomb.png", "text": "A header that declares a huge image."},
    ]
    rows = [{**row, "split": "train"} for row in train] + [
        {"id": "val_good", "image": "images/gray16.png", "text": "A validation scan.", "split": "val"},
        {"id": "test_good", "image": "images/palette_alpha.png", "text": "A test scan.", "split": "test"},
    ]
    lines = [json.dumps(row) for row in rows] + ['{"id": "broken_json", "image": ']
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def generate(out: Path, seed: int = SEED) -> None:
    """Rewrite every layout of the corpus under ``out`` (each layout folder is replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    for layout in LAYOUTS:
        shutil.rmtree(out / layout, ignore_errors=True)
    rng = np.random.default_rng(seed)
    write_vqa_rad(out, rng)
    write_roco(out, rng)
    write_melinda(out, rng)
    write_jsonl(out, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="folder to write into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    generate(args.out, args.seed)


if __name__ == "__main__":
    main()
