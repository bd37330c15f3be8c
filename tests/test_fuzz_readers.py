"""Property-based fuzzing of every reader (one test per DATA.md layout, plus the image decoder): random bytes,
random JSON / CSV / line structures, mangled encodings and random image bytes. The only exception that may leave
a reader is the package's ``DataError``, naming a file of the data set, in one line; no input may hang one.

The budget is modest (``UMD_FUZZ_EXAMPLES`` examples per reader, 60 by default, drawn from a fixed seed so CI
always runs the same inputs); raise it locally to search longer, e.g. ``UMD_FUZZ_EXAMPLES=2000
UMD_FUZZ_RANDOM=1 pytest tests/test_fuzz_readers.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from umd_lightning.data.common import DataError, check_image_header, load_image
from umd_lightning.data.pretrain import JsonlDataset, MedicatDataset, MedPixDataset, MimicCxrDataset, RocoDataset
from umd_lightning.data.sources.medmnist import medmnist_records
from umd_lightning.data.sources.medpix import medpix_records
from umd_lightning.data.sources.melinda import melinda_records
from umd_lightning.data.vqa import (
    slake_records,
    vqa_med_2019_m3ae_records,
    vqa_med_2019_records,
    vqa_rad_preprocessed_records,
    vqa_rad_records,
)

EXAMPLES = int(os.environ.get("UMD_FUZZ_EXAMPLES", "60"))
SECONDS_PER_EXAMPLE = 20
"""A reader still busy after this long on one tiny input counts as hung (Hypothesis' deadline only judges an
example once it has returned)."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms; generous, as CI shares its cores
    derandomize=not os.environ.get("UMD_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------------ harness
@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail with ``TimeoutError`` if the body runs longer than ``seconds`` (SIGALRM; main thread, POSIX)."""

    def expire(signum, frame):
        raise TimeoutError(f"a reader ran longer than {seconds} s on one fuzzed input: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_reader(root: Path, read: Callable[[], Any]) -> Any:
    """Run ``read``; a ``DataError`` must name a path under ``root`` and be one line; anything else fails."""
    try:
        with time_limit(SECONDS_PER_EXAMPLE):
            return read()
    except DataError as error:
        note(f"DataError: {error}")
        assert error.file.startswith(str(root)), f"the error names no file of the data set: {error}"
        assert "\n" not in str(error), f"a multi-line error: {error!r}"
        return None


def read_every_sample(dataset: Any) -> None:
    """Load every sample (what a DataLoader would do after the set-up scan)."""
    for index in range(len(dataset)):
        dataset[index]


@contextmanager
def data_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="umd-fuzz-") as folder:
        yield Path(folder).resolve()


# ------------------------------------------------------------------------------------------------ strategies
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
"""Any JSON value, NaN and Infinity included (Python's json writes and reads them)."""

image_names = st.sampled_from(["img0.jpg", "img1.png", "../escape.jpg", "/etc/passwd", "", "a\x00b.jpg", "sub/"])
texts = st.sampled_from(["is there a lesion?", "", "   ", "\u200b", "None", "2.0"]) | st.text(max_size=30)
answers = st.sampled_from(["yes", "No", 2, 2.0, float("nan"), float("inf"), "None", ""]) | json_values
answer_types = st.sampled_from(["OPEN", "CLOSED", "CLOSED ", "open", "maybe"]) | json_values


def field_or_noise(value: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the plausible value, sometimes any JSON value."""
    return st.one_of(value, value, json_values)


def records(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """JSON objects with some of ``fields`` (each plausible or noise), sometimes a non-object record."""
    record = st.fixed_dictionaries({}, optional={key: field_or_noise(value) for key, value in fields.items()})
    return st.one_of(record, record, record, json_values)


@st.composite
def mangled(draw, text: st.SearchStrategy[str]) -> bytes:
    """The file's bytes: ``text`` as UTF-8, with a BOM, in Latin-1, truncated, with random bytes spliced in, or
    pure random bytes."""
    content = draw(text)
    how = draw(st.sampled_from(["utf8", "bom", "latin1", "truncate", "splice", "random"]))
    data = content.encode("utf-8", "surrogatepass")
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "latin1":
        return content.encode("latin-1", "replace")
    if how == "truncate":
        return data[: draw(st.integers(0, max(0, len(data))))]
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if how == "random":
        return draw(st.binary(max_size=300))
    return data


def json_text(items: st.SearchStrategy) -> st.SearchStrategy[str]:
    """A JSON list of ``items``, or another JSON value at the top, or a deeply nested list."""
    listed = st.lists(items, max_size=6).map(lambda value: json.dumps(value, allow_nan=True))
    other = json_values.map(lambda value: json.dumps(value, allow_nan=True))
    deep = st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth)
    return st.one_of(listed, listed, listed, other, deep)


def jsonl_text(items: st.SearchStrategy) -> st.SearchStrategy[str]:
    """Lines of JSON objects, mixed with lines that are not JSON objects."""
    line = st.one_of(items.map(lambda value: json.dumps(value, allow_nan=True)), st.text(max_size=30))
    return st.lists(line, max_size=6).map("\n".join)


def csv_text(columns: list[str], cells: st.SearchStrategy) -> st.SearchStrategy[str]:
    """A CSV with (sometimes only some of, sometimes shuffled) ``columns`` and ragged rows of ``cells``."""

    @st.composite
    def build(draw) -> str:
        header = draw(st.one_of(st.just(columns), st.permutations(columns), st.lists(st.sampled_from(columns))))
        rows = draw(st.lists(st.lists(cells, max_size=len(columns) + 2), max_size=5))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()

    return build()


def lines_text(line: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(line, max_size=6).map("\n".join)


def tiny_image(mode: str, fmt: str) -> bytes:
    array = np.arange(64, dtype=np.uint8).reshape(8, 8)
    image = Image.fromarray(array).convert(mode) if mode != "F" else Image.fromarray(array.astype(np.float32))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


VALID_IMAGES = [
    tiny_image("RGB", "JPEG"),
    tiny_image("L", "PNG"),
    tiny_image("P", "PNG"),
    tiny_image("RGBA", "PNG"),
    tiny_image("F", "TIFF"),
    tiny_image("RGB", "GIF"),
    tiny_image("RGB", "BMP"),
]


@st.composite
def image_bytes(draw) -> bytes:
    """A tiny valid image (several formats and modes), one of them mutated (cut, bytes flipped), or noise."""
    data = draw(st.sampled_from(VALID_IMAGES))
    how = draw(st.sampled_from(["valid", "cut", "flip", "random", "header_only"]))
    if how == "cut":
        return data[: draw(st.integers(0, len(data)))]
    if how == "flip":
        mutable = bytearray(data)
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=6)):
            mutable[position] = draw(st.integers(0, 255))
        return bytes(mutable)
    if how == "random":
        return draw(st.binary(max_size=200))
    if how == "header_only":
        return data[:16]
    return data


def write_images(folder: Path, names: list[str], draw) -> None:
    """Write some of ``names`` as fuzzed images under ``folder`` (the others stay missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if draw(st.booleans()) or draw(st.booleans()):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(draw(image_bytes()))


policies = st.sampled_from(["raise", "skip"])


# ------------------------------------------------------------------------------------------------ images
@FUZZ
@given(data=image_bytes(), full=st.booleans())
def test_fuzz_image_decoder(data, full):
    with data_root() as root:
        path = root / "image.bin"
        path.write_bytes(data)
        image = run_reader(root, lambda: load_image(path) if full else check_image_header(path))
        if full and image is not None:
            assert image.mode == "RGB" and image.size[0] > 0


# ------------------------------------------------------------------------------------------------ VQA
VQA_RAD_FIELDS = {
    "qid": st.integers(0, 5) | st.text(max_size=4),
    "image_name": image_names,
    "question": texts,
    "answer": answers,
    "answer_type": answer_types,
    "phrase_type": st.sampled_from(["freeform", "para", "test_freeform"]),
}


@FUZZ
@given(st.data())
def test_fuzz_vqa_rad(data):
    with data_root() as root:
        write_images(root / "VQA_RAD Image Folder", ["img0.jpg", "img1.png"], data.draw)
        (root / "VQA_RAD Dataset Public.json").write_bytes(data.draw(mangled(json_text(records(VQA_RAD_FIELDS)))))
        run_reader(root, lambda: vqa_rad_records(root, on_error=data.draw(policies)))


@FUZZ
@given(st.data())
def test_fuzz_vqa_rad_preprocessed(data):
    with data_root() as root:
        write_images(root / "images", ["img0.jpg", "img1.png"], data.draw)
        for name in ("trainset.json", "testset.json", "valset.json"):
            if name != "valset.json" or data.draw(st.booleans()):
                (root / name).write_bytes(data.draw(mangled(json_text(records(VQA_RAD_FIELDS)))))
        run_reader(root, lambda: vqa_rad_preprocessed_records(root, on_error=data.draw(policies)))


SLAKE_FIELDS = {
    "qid": st.integers(0, 5),
    "img_id": st.integers(0, 3),
    "img_name": st.sampled_from(["xmlab1/source.jpg", "xmlab2/source.jpg"]) | image_names,
    "question": texts,
    "answer": answers,
    "answer_type": answer_types,
    "q_lang": st.sampled_from(["en", "zh"]),
}


@FUZZ
@given(st.data())
def test_fuzz_slake(data):
    with data_root() as root:
        write_images(root / "imgs", ["xmlab1/source.jpg", "xmlab2/source.jpg"], data.draw)
        for name in ("train.json", "validate.json", "test.json"):
            (root / name).write_bytes(data.draw(mangled(json_text(records(SLAKE_FIELDS)))))
        language = data.draw(st.sampled_from(["en", None]))
        run_reader(root, lambda: slake_records(root, language=language, on_error=data.draw(policies)))


def pipe_line(fields: int) -> st.SearchStrategy[str]:
    cell = st.sampled_from(["img0", "what modality is shown?", "ct", "", "axial", "organ"]) | st.text(max_size=10)
    return st.lists(cell, min_size=1, max_size=fields + 1).map("|".join)


@FUZZ
@given(st.data())
def test_fuzz_vqa_med_2019(data):
    with data_root() as root:
        for folder, images, suffix in (
            ("ImageClef-2019-VQA-Med-Training", "Train_images", "train"),
            ("ImageClef-2019-VQA-Med-Validation", "Val_images", "val"),
        ):
            write_images(root / folder / images, ["img0.jpg"], data.draw)
            for number, category in ((1, "Modality"), (2, "Plane"), (3, "Organ")):
                file = root / folder / "QAPairsByCategory" / f"C{number}_{category}_{suffix}.txt"
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(data.draw(mangled(lines_text(pipe_line(3)))))
        test = root / "VQAMed2019Test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt"
        write_images(test.parent / "VQAMed2019_Test_Images", ["img0.jpg"], data.draw)
        test.write_bytes(data.draw(mangled(lines_text(pipe_line(4)))))
        run_reader(root, lambda: vqa_med_2019_records(root, on_error=data.draw(policies)))


@FUZZ
@given(st.data())
def test_fuzz_vqa_med_2019_m3ae(data):
    with data_root() as root:
        for split in ("train", "val", "test"):
            write_images(root / split / "images", ["img0.jpg"], data.draw)
            for category in ("Modality", "Plane", "Organ"):
                file = root / split / "QA" / f"{category}.csv"
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(data.draw(mangled(lines_text(pipe_line(3)))))
        run_reader(root, lambda: vqa_med_2019_m3ae_records(root, on_error=data.draw(policies)))


# ------------------------------------------------------------------------------------------------ classification
MELINDA_COLUMNS = ["figure_file", "caption", "i_meth", "p_meth", "i_meth_label", "p_meth_label"]


@FUZZ
@given(st.data())
def test_fuzz_melinda(data):
    with data_root() as root:
        write_images(root / "melinda_images", ["img0.jpg", "img1.png"], data.draw)
        cells = st.sampled_from(["img0.jpg", "img1.png", "../x.jpg", "", "Blot", "A western blot."]) | st.text(
            max_size=10
        )
        for name in ("train.csv", "dev.csv", "test.csv"):
            (root / name).write_bytes(data.draw(mangled(csv_text(MELINDA_COLUMNS, cells))))
        run_reader(root, lambda: melinda_records(root, on_error=data.draw(policies)))


MEDPIX_FIELDS = {
    "image": st.sampled_from(["MPX1_synpic1", "MPX2_synpic2", "../x"]) | st.text(max_size=8),
    "U_id": st.sampled_from(["MPX1", "MPX2"]),
    "Type": st.sampled_from(["CT", "MR"]),
    "Location Category": st.sampled_from(["Head", "Thorax", ""]),
    "Description": st.fixed_dictionaries({}, optional={"Caption": texts}),
}


def write_medpix(root: Path, data) -> None:
    write_images(root / "images", ["MPX1_synpic1.png", "MPX2_synpic2.png"], data.draw)
    for split in ("train", "dev", "test"):
        file = root / "splitted_dataset" / f"descriptions_{split}.jsonl"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data.draw(mangled(jsonl_text(records(MEDPIX_FIELDS)))))


@FUZZ
@given(st.data())
def test_fuzz_medpix(data):
    with data_root() as root:
        write_medpix(root, data)
        policy = data.draw(policies)
        run_reader(root, lambda: medpix_records(root, on_error=policy))
        split = data.draw(st.sampled_from(["train", "val"]))
        dataset = run_reader(root, lambda: MedPixDataset(root, split, on_error=policy))
        if dataset is not None:
            run_reader(root, lambda: read_every_sample(dataset))


@st.composite
def npz_bytes(draw) -> bytes:
    """A MedMNIST-like archive with arrays of random shapes and types, some missing, or a mangled archive."""
    arrays = {}
    for split in ("train", "val", "test"):
        for kind in ("images", "labels"):
            if draw(st.integers(0, 9)) == 0:
                continue
            shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=4)))
            dtype = draw(st.sampled_from([np.uint8, np.int64, np.float32, np.bool_]))
            arrays[f"{split}_{kind}"] = np.zeros(shape, dtype=dtype) + draw(st.integers(0, 3)).__int__()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    how = draw(st.sampled_from(["valid", "valid", "cut", "random", "npy", "zip_of_text"]))
    if how == "cut":
        return data[: draw(st.integers(0, len(data)))]
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "npy":
        single = io.BytesIO()
        np.save(single, np.zeros((2, 2)))
        return single.getvalue()
    if how == "zip_of_text":
        other = io.BytesIO()
        with zipfile.ZipFile(other, "w") as archive:
            archive.writestr("train_images.npy", draw(st.binary(max_size=40)))
        return other.getvalue()
    return data


@FUZZ
@given(data=npz_bytes())
def test_fuzz_medmnist(data):
    with data_root() as root:
        path = root / "pneumoniamnist.npz"
        path.write_bytes(data)
        run_reader(root, lambda: medmnist_records(path))


# ------------------------------------------------------------------------------------------------ pairs
roco_lines = st.one_of(
    st.tuples(st.sampled_from(["ROCO_00001", "ROCO_00002", "../../x", "", "ROCO 3"]), texts).map("\t".join),
    st.text(max_size=30),
    st.lists(st.text(max_size=8), min_size=3, max_size=4).map("\t".join),
)


@FUZZ
@given(st.data())
def test_fuzz_roco(data):
    with data_root() as root:
        folder = root / data.draw(st.sampled_from(["train", "validation", "val"])) / "radiology"
        write_images(folder / "images", ["ROCO_00001.jpg", "ROCO_00002.jpg"], data.draw)
        (folder / "captions.txt").write_bytes(data.draw(mangled(lines_text(roco_lines))))
        split = "train" if folder.parent.name == "train" else "val"
        dataset = run_reader(root, lambda: RocoDataset(root, split, on_error=data.draw(policies)))
        if dataset is not None:
            run_reader(root, lambda: read_every_sample(dataset))


MEDICAT_FIELDS = {
    "pdf_hash": st.sampled_from(["abc", "def"]) | st.text(max_size=5),
    "fig_uri": st.sampled_from(["fig1.jpg", "fig2.png", "../../x.jpg"]),
    "radiology": st.booleans(),
    "s2_caption": texts,
    "s2orc_references": st.none() | st.lists(texts, max_size=3),
}


@FUZZ
@given(st.data())
def test_fuzz_medicat(data):
    with data_root() as root:
        write_images(root / "release" / "figures", ["abc_fig1.jpg", "def_fig2.png"], data.draw)
        file = root / "release" / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"
        file.write_bytes(data.draw(mangled(jsonl_text(records(MEDICAT_FIELDS)))))
        split = data.draw(st.sampled_from(["train", "val", "test"]))
        dataset = run_reader(root, lambda: MedicatDataset(root, split, on_error=data.draw(policies), holdout=1))
        if dataset is not None:
            run_reader(root, lambda: read_every_sample(dataset))


@FUZZ
@given(st.data())
def test_fuzz_mimic_cxr(data):
    with data_root() as root:
        ids = st.sampled_from(["d1", "d2", "", "../d"])
        numbers = st.sampled_from(["10000001", "10000002", "50000001", "x", ""])
        metadata_cells = ids | numbers | st.sampled_from(["PA", "AP", "LATERAL"])
        (root / "mimic-cxr-2.0.0-metadata.csv").write_bytes(
            data.draw(mangled(csv_text(["dicom_id", "subject_id", "study_id", "ViewPosition"], metadata_cells)))
        )
        split_cells = ids | numbers | st.sampled_from(["train", "validate", "test"])
        (root / "mimic-cxr-2.0.0-split.csv").write_bytes(
            data.draw(mangled(csv_text(["dicom_id", "study_id", "subject_id", "split"], split_cells)))
        )
        study = root / "files" / "p10" / "p10000001"
        report = st.sampled_from(["FINDINGS: clear lungs.\nIMPRESSION: normal.", "IMPRESSION:", ""]) | st.text()
        study.mkdir(parents=True)
        (study / "s50000001.txt").write_bytes(data.draw(mangled(report)))
        write_images(study / "s50000001", ["d1.jpg", "d2.jpg"], data.draw)
        views = data.draw(st.sampled_from([("PA", "AP"), None]))
        dataset = run_reader(root, lambda: MimicCxrDataset(root, "train", on_error=data.draw(policies), views=views))
        if dataset is not None:
            run_reader(root, lambda: read_every_sample(dataset))


JSONL_FIELDS = {
    "image": image_names,
    "text": texts | st.lists(texts, max_size=3),
    "split": st.sampled_from(["train", "Train", " TEST ", "val", "dev", "trian"]),
    "id": st.text(max_size=5) | st.integers(),
}


@FUZZ
@given(st.data())
def test_fuzz_jsonl(data):
    with data_root() as root:
        write_images(root, ["img0.jpg", "img1.png"], data.draw)
        file = root / "data.jsonl"
        file.write_bytes(data.draw(mangled(jsonl_text(records(JSONL_FIELDS)))))
        split = data.draw(st.sampled_from([None, "train", "val"]))
        dataset = run_reader(root, lambda: JsonlDataset(file, split, on_error=data.draw(policies)))
        if dataset is not None:
            run_reader(root, lambda: read_every_sample(dataset))


@settings(max_examples=1, database=None, deadline=None)
@given(st.just(None))
def test_the_harness_fails_on_a_foreign_exception_and_on_a_hang(nothing):
    """The fuzz tests above can fail: an exception other than DataError escapes, an error names a file outside
    the data set, and a hang times out."""
    with data_root() as root:
        with pytest.raises(KeyError):
            run_reader(root, lambda: {}["missing"])
        with pytest.raises(AssertionError, match="names no file of the data set"):
            run_reader(root, lambda: (_ for _ in ()).throw(DataError("bad_json", "/elsewhere/file", 1, "x")))
        assert run_reader(root, lambda: (_ for _ in ()).throw(DataError("bad_json", root / "f", 1, "x"))) is None
    with pytest.raises(TimeoutError, match="hangs"), time_limit(1):
        signal.pause()
