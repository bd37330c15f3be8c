"""Write the corpus of bad inputs: small data sets in the publishers' layouts, each holding broken records.

Run ``.venv/bin/python tests/data/bad/make_bad_inputs.py`` (seed 7) to rewrite the corpus beside this script;
``--out DIR`` writes it elsewhere (``tests/test_bad_inputs.py`` checks that a fresh run equals the committed
files). Every image is a 32 x 32 px synthetic "scan"; nothing here is real data. ``README.md`` lists every bad
input, the record that holds it and the behaviour the loaders must show.

The decompression bomb (``bomb.png``) is a 66-byte PNG whose header declares 60,000 x 60,000 pixels and whose
pixel data is never written: PIL refuses it when it opens the header, so nothing huge is committed and no test
has to lower ``Image.MAX_IMAGE_PIXELS``.

The layouts after ``jsonl`` (``ISSUE_10_LAYOUTS``: encodings, byte-order marks, EXIF orientation, float TIFFs
with NaN, numeric and non-finite answers, repeated qids, an unusable training split, a third ROCO column, JSONL
split names in other cases, broken checkpoints and exports) draw from the random generator after the older
layouts, so adding them left the older files byte for byte as they were.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pickle
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from umd_lightning.vocabulary import VOCABULARY_CHECKSUM_KEY, vocabulary_checksum

SEED = 7
SIZE = 32
ISSUE_10_LAYOUTS = (
    "vqa_rad_bad_encoding",
    "slake_bad_encoding",
    "melinda_bad_encoding",
    "mimic_cxr_bad_encoding",
    "vqa_rad_bom",
    "melinda_bom",
    "vqa_rad_answers",
    "vqa_rad_same_qid",
    "vqa_rad_all_bad",
    "roco_extra_column",
    "jsonl_split_case",
    "jsonl_images",
    "weights",
)
LAYOUTS = ("vqa_rad", "vqa_rad_not_a_list", "roco", "melinda", "melinda_missing_column", "jsonl", *ISSUE_10_LAYOUTS)
LATIN_1_QUESTION = "is the caf\u00e9-au-lait spot benign?"
"""A question written in Latin-1 instead of UTF-8 by the ``*_bad_encoding`` layouts: its ``\u00e9`` is the one
invalid byte (0xe9) of the file."""
EXPORT_LABELS = ["yes", "no", "lung"]
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


# ------------------------------------------------------------------------------------------------ issue 10
def exif_rotated_jpeg(rng: np.random.Generator) -> bytes:
    """A JPEG stored upside down with EXIF Orientation 3 ("rotate 180 to display"): the stored pixels are bright in
    the bottom half and dark in the top half, so it displays bright on top."""
    pixels = np.full((SIZE, SIZE), 20, np.uint8) + rng.integers(0, 10, size=(SIZE, SIZE)).astype(np.uint8)
    pixels[SIZE // 2 :, :] = 230
    exif = Image.Exif()
    exif[0x0112] = 3
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def float_tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.float32), mode="F").save(buffer, "TIFF")
    return buffer.getvalue()


def float_nan_tiff(rng: np.random.Generator) -> bytes:
    """A 32-bit float TIFF with values 100 (top-left) to 200 (bottom-right) and one NaN pixel at (5, 5)."""
    ramp = np.linspace(100.0, 200.0, SIZE * SIZE).reshape(SIZE, SIZE)
    ramp[5, 5] = np.nan
    return float_tiff(ramp)


def float_inf_tiff(rng: np.random.Generator) -> bytes:
    """The same ramp with +inf at (0, 1) and -inf at (0, 2)."""
    ramp = np.linspace(100.0, 200.0, SIZE * SIZE).reshape(SIZE, SIZE)
    ramp[0, 1], ramp[0, 2] = np.inf, -np.inf
    return float_tiff(ramp)


def write_json(path: Path, value: object, *, bom: bool = False) -> None:
    text = json.dumps(value, indent=1, ensure_ascii=False) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def with_latin_1(text: str) -> bytes:
    """``text`` as UTF-8 except for the question :data:`LATIN_1_QUESTION`, written in Latin-1."""
    before, question, after = text.partition(LATIN_1_QUESTION)
    assert question, "the Latin-1 question must be in the text"
    return before.encode("utf-8") + question.encode("latin-1") + after.encode("utf-8")


def write_encodings(out: Path, rng: np.random.Generator) -> None:
    """One file per whole-file reader with a Latin-1 byte; VQA-RAD and MELINDA copies that start with a BOM."""
    rad_rows = [
        ("good", "synpic100.jpg", "is there a bright disc?", "yes", "CLOSED", False),
        ("latin_1", "synpic100.jpg", LATIN_1_QUESTION, "yes", "CLOSED", False),
        ("test_good", "synpic101.jpg", "is there a fracture?", "no", "CLOSED", True),
    ]
    entries = [vqa_rad_entry(*row[:5], test=row[5]) for row in rad_rows]
    root = out / "vqa_rad_bad_encoding"
    root.mkdir(parents=True)
    text = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
    (root / "VQA_RAD Dataset Public.json").write_bytes(with_latin_1(text))

    root = out / "vqa_rad_bom"
    write_images(root / "VQA_RAD Image Folder", {"synpic100.jpg": good_jpeg, "synpic101.jpg": good_jpeg}, rng)
    write_json(root / "VQA_RAD Dataset Public.json", [e for e in entries if e["qid"] != "latin_1"], bom=True)

    root = out / "slake_bad_encoding"
    root.mkdir(parents=True)

    def slake(qid: int, question: str) -> dict:
        return {
            "img_id": 1,
            "img_name": "xmlab1/source.jpg",
            "question": question,
            "answer": "Yes",
            "q_lang": "en",
            "answer_type": "CLOSED",
            "qid": qid,
        }

    train = json.dumps([slake(1, "is this a ct?"), slake(2, LATIN_1_QUESTION)], indent=1, ensure_ascii=False)
    (root / "train.json").write_bytes(with_latin_1(train + "\n"))
    write_json(root / "validate.json", [slake(3, "is this a ct?")])
    write_json(root / "test.json", [slake(4, "is this a ct?")])

    root = out / "melinda_bad_encoding"
    root.mkdir(parents=True)
    rows = [melinda_row("PMC1_F1.jpg", "Western blot of the protein.", "Blot")]
    bad = [*rows, melinda_row("PMC2_F1.jpg", f"Caption asking {LATIN_1_QUESTION}", "Blot")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MELINDA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(bad)
    (root / "train.csv").write_bytes(with_latin_1(buffer.getvalue()))
    write_csv(root / "dev.csv", MELINDA_COLUMNS, rows)
    write_csv(root / "test.csv", MELINDA_COLUMNS, rows)

    root = out / "melinda_bom"
    write_images(root / "melinda_images", {"PMC1_F1.jpg": good_jpeg, "PMC2_F1.jpg": good_jpeg}, rng)
    for name, figure in (("train.csv", "PMC1_F1.jpg"), ("dev.csv", "PMC2_F1.jpg"), ("test.csv", "PMC2_F1.jpg")):
        write_csv(root / name, MELINDA_COLUMNS, [melinda_row(figure, "Western blot of the protein.", "Blot")])
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())

    root = out / "mimic_cxr_bad_encoding"
    root.mkdir(parents=True)
    metadata = f"dicom_id,subject_id,study_id,ViewPosition,Note\nd1,10000001,50000001,PA,{LATIN_1_QUESTION}\n"
    (root / "mimic-cxr-2.0.0-metadata.csv").write_bytes(with_latin_1(metadata))
    (root / "mimic-cxr-2.0.0-split.csv").write_text("dicom_id,study_id,subject_id,split\nd1,50000001,10000001,train\n")


def write_vqa_questions(out: Path, rng: np.random.Generator) -> None:
    """VQA-RAD copies for answers, qids and an unusable training split."""
    root = out / "vqa_rad_answers"
    write_images(root / "VQA_RAD Image Folder", {"synpic100.jpg": good_jpeg, "synpic101.jpg": good_jpeg}, rng)
    train = [
        ("int_answer", "synpic100.jpg", "how many lesions?", 2, "OPEN"),
        ("float_answer", "synpic100.jpg", "how many nodules?", 2.0, "OPEN"),
        ("text_answer", "synpic100.jpg", "how many cysts?", "2.0", "OPEN"),
        ("decimal_answer", "synpic100.jpg", "how large in cm?", "2.50", "OPEN"),
        ("nan_answer", "synpic100.jpg", "how many masses?", float("nan"), "OPEN"),
        ("infinity_answer", "synpic100.jpg", "how many stones?", float("inf"), "OPEN"),
        ("zero_width_question", "synpic100.jpg", "\u200b\u200b \u2060", "yes", "CLOSED"),
        ("good", "synpic100.jpg", "is there a bright disc?", "yes", "CLOSED"),
    ]
    test = [("test_decimal", "synpic101.jpg", "how large in cm?", 2.5, "OPEN")]
    entries = [vqa_rad_entry(*row, test=False) for row in train] + [vqa_rad_entry(*row, test=True) for row in test]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")

    root = out / "vqa_rad_same_qid"
    write_images(root / "VQA_RAD Image Folder", {"synpic100.jpg": good_jpeg, "synpic101.jpg": good_jpeg}, rng)
    rows = [
        ("0", "synpic100.jpg", "is there a bright disc?", "yes", "CLOSED", False),
        ("0", "synpic100.jpg", "what organ is shown?", "lung", "OPEN", False),
        ("0", "synpic100.jpg", "is there a fracture?", "no", "CLOSED", False),
        ("test_0", "synpic101.jpg", "is there a bright disc?", "yes", "CLOSED", True),
    ]
    entries = [vqa_rad_entry(*row[:5], test=row[5]) for row in rows]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")

    root = out / "vqa_rad_all_bad"
    write_images(
        root / "VQA_RAD Image Folder",
        {"truncated.jpg": truncated_jpeg, "zero_bytes.jpg": zero_bytes, "synpic101.jpg": good_jpeg},
        rng,
    )
    rows = [
        ("truncated", "truncated.jpg", "is there a bright disc?", "yes", "CLOSED", False),
        ("zero_bytes", "zero_bytes.jpg", "is there a fracture?", "no", "CLOSED", False),
        ("missing", "synpic999.jpg", "what organ is shown?", "lung", "OPEN", False),
        ("test_good", "synpic101.jpg", "is there a bright disc?", "yes", "CLOSED", True),
    ]
    entries = [vqa_rad_entry(*row[:5], test=row[5]) for row in rows]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")


def write_pair_layouts(out: Path, rng: np.random.Generator) -> None:
    """ROCO with a third tab column; JSONL split names in other cases; EXIF-rotated and float images."""
    root = out / "roco_extra_column"
    lines = {
        "train": [
            "ROCO_00021\tComputed tomography of the chest showing a round lesion.",
            "ROCO_00022\tAxial CT of the abdomen with contrast.\tC0040405",
            "ROCO_00023\t  Sagittal   MRI of the   knee.  ",
        ],
        "validation": ["ROCO_00024\tUltrasound of the liver with a cyst."],
        "test": ["ROCO_00025\tFrontal chest radiograph with a nodule."],
    }
    images = {
        "train": ("ROCO_00021", "ROCO_00022", "ROCO_00023"),
        "validation": ("ROCO_00024",),
        "test": ("ROCO_00025",),
    }
    for split, split_lines in lines.items():
        folder = root / split / "radiology"
        write_images(folder / "images", {f"{name}.jpg": good_jpeg for name in images[split]}, rng)
        (folder / "captions.txt").write_text("\n".join(split_lines) + "\n", encoding="utf-8")

    root = out / "jsonl_split_case"
    write_images(root / "images", {"a.png": palette_alpha_png, "b.png": gray16_png}, rng)
    rows = [
        {"id": "upper_train", "image": "images/a.png", "text": "A scan of the chest.", "split": "Train"},
        {"id": "lower_train", "image": "images/b.png", "text": "A scan of the head.", "split": "train"},
        {"id": "spaced_test", "image": "images/a.png", "text": "A scan of the knee.", "split": " TEST "},
        {"id": "upper_val", "image": "images/b.png", "text": "A scan of the hand.", "split": "Validation"},
        {"id": "misspelt", "image": "images/a.png", "text": "A scan of the foot.", "split": "trian"},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    root = out / "jsonl_images"
    write_images(
        root / "images",
        {"exif_rotated.jpg": exif_rotated_jpeg, "float_nan.tif": float_nan_tiff, "float_inf.tif": float_inf_tiff},
        rng,
    )
    rows = [
        {"id": "exif_rotated", "image": "images/exif_rotated.jpg", "text": "Bright on top as displayed."},
        {"id": "float_nan", "image": "images/float_nan.tif", "text": "A float scan with one NaN pixel."},
        {"id": "float_inf", "image": "images/float_inf.tif", "text": "A float scan with infinite pixels."},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def stored_zip(members: dict[str, bytes]) -> bytes:
    """A zip archive of uncompressed members with a fixed date, laid out like a ``torch.save`` file."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of float32 tensors, its JSON header with sorted keys (safetensors' own writer orders the
    metadata differently from run to run), padded with spaces to 8 bytes as the format recommends."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset, data = 0, b""
    for name, array in sorted(tensors.items()):
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        offset, data = offset + len(raw), data + raw
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def export_config(labels: list[str]) -> dict:
    """The fields of an export's ``config.json`` that :func:`umd_lightning.export.read_export_config` checks."""
    return {"format": "umd_lightning.export/1", "stage": "finetune", "task": "vqa", "labels": labels}


def write_weights(out: Path, rng: np.random.Generator) -> None:
    """Checkpoints that are broken rather than unsafe, and exports with a truncated, broken or mismatched file."""
    root = out / "weights"
    root.mkdir(parents=True)
    whole = stored_zip({"archive/data.pkl": pickle.dumps({"state_dict": {}}, protocol=2), "archive/version": b"3\n"})
    (root / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (root / "text.ckpt").write_text("model: runs/umd/version_3/checkpoints/last.ckpt\n", encoding="utf-8")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "truncated.safetensors").write_bytes(safetensors_bytes({"w": np.arange(64, dtype=np.float32)})[:-40])

    weights = rng.standard_normal((len(EXPORT_LABELS), 4)).astype(np.float32)
    metadata = {"format": "pt", "umd_stage": "finetune", VOCABULARY_CHECKSUM_KEY: vocabulary_checksum(EXPORT_LABELS)}
    intact = safetensors_bytes({"head.weight": weights}, metadata=metadata)
    config = json.dumps(export_config(EXPORT_LABELS), indent=2) + "\n"
    for name, weights_file, config_file in (
        ("export_truncated_weights", intact[:-24], config),
        ("export_broken_config", intact, config[: len(config) // 2]),
        ("export_reordered_labels", intact, json.dumps(export_config(EXPORT_LABELS[::-1]), indent=2) + "\n"),
    ):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(weights_file)
        (root / name / "config.json").write_text(config_file, encoding="utf-8")


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
    write_encodings(out, rng)
    write_vqa_questions(out, rng)
    write_pair_layouts(out, rng)
    write_weights(out, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="folder to write into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    generate(args.out, args.seed)


if __name__ == "__main__":
    main()
