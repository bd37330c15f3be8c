"""`umd serve` in a real headless browser (Debian's chromium driven by Playwright): open the page, upload an
image, ask, read the answer and see the overlays; then the bad inputs, each answered on the page; the server is
still up at the end. ``UMD_SERVE_SCREENSHOTS=docs`` also saves the screenshots the README shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from PIL import Image

from umd_lightning.export import export_model
from umd_lightning.serve import decode_upload
from umd_lightning.serve.app import BadInput
from umd_lightning.stages import FineTune

REPO = Path(__file__).resolve().parents[1]
VQA_RAD = REPO / "tests" / "data" / "vqa_rad"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def write_dicom(path: Path, pixels: np.ndarray, center: float, width: float) -> Path:
    """A minimal uncompressed CT DICOM file with a window."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_window_is_applied(tmp_path):
    # stored values 0..2047 -> HU -1024..1023; window 0 +- 50 HU: below is black, above is white
    pixels = np.tile(np.linspace(0, 2047, 64), (64, 1))
    image = np.asarray(decode_upload(write_dicom(tmp_path / "a.dcm", pixels, 0, 100).read_bytes()))
    assert image.shape == (64, 64, 3)
    grey = image[0, :, 0].astype(int)
    assert grey[:28].max() == 0 and grey[-28:].min() == 255 and 0 < grey[32] < 255
    with pytest.raises(BadInput, match="DICOM file cannot be read"):
        decode_upload(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(BadInput, match="not an image"):
        decode_upload(b"hello, not an image")


@pytest.fixture(scope="module")
def export_folder(tiny_vqa_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(tiny_vqa_checkpoint, tmp_path_factory.mktemp("serve") / "export")


@pytest.fixture()
def server(export_folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "umd_lightning",
        "serve",
        str(export_folder),
        "--port",
        "0",
        "--max-upload-mb",
        "1",
    ]
    command += ["--max-pixels", "10000000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "on http://127.0.0.1:" in line, line
        yield line.split(" on ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_page_answers_and_survives_bad_inputs(server, tmp_path):
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does it)")
    image = sorted((VQA_RAD / "VQA_RAD Image Folder").iterdir())[0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    huge = tmp_path / "huge.png"
    Image.new("L", (4000, 4000)).save(huge)  # 16 MP: a small file, more pixels than allowed below
    too_big = tmp_path / "big.jpg"
    too_big.write_bytes(np.random.default_rng(0).bytes(3 * 2**20))
    dicom = write_dicom(tmp_path / "scan.dcm", np.tile(np.linspace(0, 2047, 96), (96, 1)), 40, 400)
    shots = Path(os.environ.get("UMD_SERVE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(  # a fresh profile folder per run
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1000, "height": 800},
        )
        page = browser.new_page()
        page.goto(server)
        assert "Ask the model" in page.title() + page.inner_text("h1")
        page.wait_for_selector("#ask", state="visible")
        assert page.is_hidden("#rank")  # a VQA model: the question form only

        def ask(file: Path | None, question: str) -> None:
            page.evaluate("document.getElementById('answer').textContent = ''")
            page.evaluate("document.getElementById('error').textContent = ''")
            if file is not None:
                page.set_input_files("#image", str(file))
            page.fill("#question", question)
            page.click("#submit")
            page.wait_for_function(
                "document.getElementById('answer').textContent || document.getElementById('error').textContent"
            )

        ask(image, "is there a lesion on the left side?")
        answer = page.inner_text("#answer")
        assert answer and page.inner_text("#error") == ""
        rows = page.locator("#top5 tbody tr")
        assert rows.count() == 5 and rows.first.inner_text().startswith(answer)
        for method in ("rollout", "gradcam"):
            src = page.get_attribute(f"#overlay-{method}", "src")
            assert src.startswith("data:image/png;base64,")
            assert page.evaluate(f"document.getElementById('overlay-{method}').naturalWidth") == 32
        page.screenshot(path=str(shots / "serve_answer.png"), full_page=True)

        ask(dicom, "what organ is shown?")
        assert page.inner_text("#answer") and page.inner_text("#error") == ""

        bad = {
            not_image: ("is there a lesion?", "not an image"),
            image: ("   ", "question is empty"),
            huge: ("is there a lesion?", "more than the"),
            too_big: ("is there a lesion?", "MB, more than the 1 MB"),
        }
        for file, (question, message) in bad.items():
            ask(file, question)
            assert message in page.inner_text("#error"), (file.name, page.inner_text("#error"))
            if file == not_image:
                page.screenshot(path=str(shots / "serve_bad_input.png"), full_page=True)
        ask(image, "what organ is shown?")  # still answering after the bad inputs
        assert page.inner_text("#answer") and page.inner_text("#error") == ""
        browser.close()

    with urllib.request.urlopen(f"{server}/api/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as caught:  # no file route: nothing but the page is served
        urllib.request.urlopen(f"{server}/../../etc/passwd", timeout=10)
    assert caught.value.code == 404


@pytest.fixture(scope="module")
def retrieval_checkpoint(tmp_path_factory) -> Path:
    """A (randomly initialised) tiny retrieval model saved as a fine-tuning checkpoint."""
    import torch

    pl.seed_everything(0)
    model = FineTune(preset="tiny", task="retrieval", data_card={"max_text_length": 24})
    path = tmp_path_factory.mktemp("retrieval") / "retrieval.ckpt"
    hparams = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_")}
    torch.save({"umd_stage": "finetune", "hyper_parameters": hparams, "state_dict": model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_a_retrieval_model_ranks_the_uploaded_images_by_caption(retrieval_checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    from umd_lightning.serve.retrieval import RetrievalScorer

    images = sorted((VQA_RAD / "VQA_RAD Image Folder").iterdir())[:3]
    caption = "CT of the chest showing a bright circle in the upper left"
    scorer = RetrievalScorer.from_checkpoint(retrieval_checkpoint)
    expected = sorted(((scorer.score(Image.open(p), caption), p.name) for p in images), reverse=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "umd_lightning", "serve", str(retrieval_checkpoint), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "retrieval model" in line and "on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#rank", state="visible")
            assert page.is_hidden("#ask")  # a retrieval model: the caption form only
            page.set_input_files("#gallery", [str(p) for p in images])
            page.fill("#caption", caption)
            page.click("#rank-submit")
            page.wait_for_function("document.querySelectorAll('#ranking li').length === 3")
            shown = page.locator("#ranking li .ranked").all_inner_texts()
            assert [text.split()[0] for text in shown] == [name for _, name in expected]
            for text, (score, _) in zip(shown, expected):
                assert float(text.split()[-1]) == pytest.approx(score, abs=1e-3)
            assert page.evaluate("document.querySelector('#ranking li img').naturalWidth") > 0
            shots = Path(os.environ.get("UMD_SERVE_SCREENSHOTS", tmp_path))
            page.screenshot(path=str(shots / "serve_retrieval.png"), full_page=True)
            page.fill("#caption", " ")
            page.click("#rank-submit")
            page.wait_for_function("document.getElementById('error').textContent")
            assert "caption is empty" in page.inner_text("#error")
            browser.close()
        with urllib.request.urlopen(f"{url}/api/health", timeout=10) as response:
            assert json.loads(response.read())["task"] == "retrieval"
    finally:
        process.terminate()
        process.wait(timeout=30)
