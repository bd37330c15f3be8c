"""The ``umd serve`` web app: one page and two JSON endpoints on Python's own ``http.server``.

Why the standard library and not Gradio: the app needs one page, one upload and one answer. Gradio would add
about forty packages (FastAPI, uvicorn, pandas, its front-end bundle, ...) and, by default, endpoints this app
does not want (a file route, analytics, a share tunnel) that would each have to be turned off and kept off across
its releases. Here everything the server does is in this file: ``GET /`` returns the page, ``POST /api/answer``
takes the image bytes as the request body and the question as a query parameter (``POST /api/score`` the same
with a caption, for a retrieval model: the page sends each uploaded image and ranks them by score), and nothing
else is routed.

Safety: binds to 127.0.0.1 unless told otherwise; refuses a body larger than ``--max-upload-mb`` (from its
Content-Length, before reading it) and images of more than ``--max-pixels`` pixels (before decoding them); reads
no file from disk after start-up (the uploaded bytes are decoded in memory and never written); every bad input
(not an image, an empty question, a huge image, a broken DICOM) is answered with a message the page shows, and
the server keeps running.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PIXELS = 50_000_000
MAX_QUESTION_CHARS = 500


class BadInput(ValueError):
    """An upload or question the app answers with a message (HTTP 400 / 413)."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def _dicom_to_image(data: bytes) -> Image.Image:
    """A DICOM file's first frame as an 8-bit RGB image, with its modality LUT and its window (VOI LUT) applied."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as exc:  # pragma: no cover - the serve extra is not installed
        raise BadInput("DICOM needs pydicom: pip install 'umd_lightning[serve]'") from exc
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise BadInput(f"the DICOM file cannot be read: {str(exc).splitlines()[0][:200]}") from exc
    if pixels.ndim == 3 and getattr(dataset, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # a multi-frame series: its first frame
    if getattr(dataset, "SamplesPerPixel", 1) == 3:
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1: high values are dark
    return Image.fromarray((scaled * 255).round().astype(np.uint8)).convert("RGB")


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The uploaded bytes as an RGB image: DICOM (``DICM`` at byte 128), or anything PIL reads (PNG, JPEG, ...).

    Raises:
        BadInput: empty, not an image, larger than ``max_pixels``, or undecodable.
    """
    if not data:
        raise BadInput("no image was uploaded: choose a PNG, JPEG or DICOM file")
    if data[128:132] == b"DICM":
        image = _dicom_to_image(data)
    else:
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError) as exc:
            raise BadInput("the file is not an image this app reads: upload a PNG, JPEG or DICOM file") from exc
        width, height = image.size
        if width * height > max_pixels:
            raise BadInput(
                f"the image is {width} x {height} pixels, more than the {max_pixels:,} this server accepts",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        try:
            image.load()
        except (OSError, Image.DecompressionBombError) as exc:
            raise BadInput(f"the image cannot be decoded: {exc}") from exc
    if image.width * image.height > max_pixels:
        raise BadInput(f"the image has more than {max_pixels:,} pixels", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return image.convert("RGB")


def _typed_text(text: str, kind: str, hint: str) -> str:
    """``text`` stripped; :class:`BadInput` when it is empty (with ``hint``) or longer than the page allows."""
    text = text.strip()
    if not text:
        raise BadInput(f"the {kind} is empty: {hint}")
    if len(text) > MAX_QUESTION_CHARS:
        raise BadInput(f"the {kind} is longer than {MAX_QUESTION_CHARS} characters")
    return text


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class App:
    """What the handler calls: the loaded model and its one lock (one answer at a time on the model).

    Args:
        predictor: a :class:`~umd_lightning.predict.Predictor`.
        max_upload_bytes: the largest request body accepted.
        max_pixels: the largest image accepted.
    """

    def __init__(self, predictor: Any, max_upload_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.predictor = predictor
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self.page = resources.files("umd_lightning.serve").joinpath("page.html").read_bytes()

    def score(self, data: bytes, caption: str) -> dict[str, Any]:
        """A retrieval model's score of ``caption`` for one uploaded image, with the image as the model saw it.

        Raises:
            BadInput: see :func:`decode_upload`; an empty or overlong caption; a model that does not retrieve.
        """
        if self.predictor.model.task != "retrieval":
            raise BadInput("this model answers questions: use the question form")
        caption = _typed_text(caption, "caption", "type a caption to find images for")
        image = decode_upload(data, self.max_pixels)
        with self.lock:
            value = self.predictor.score(image, caption)
        thumbnail = image.copy()
        thumbnail.thumbnail((160, 160))
        return {"caption": caption, "score": value, "image": _png_data_url(thumbnail)}

    def answer(self, data: bytes, question: str) -> dict[str, Any]:
        """The JSON the page shows for one upload and question.

        Raises:
            BadInput: see :func:`decode_upload`; an empty or overlong question.
        """
        if self.predictor.model.task == "retrieval":
            raise BadInput("this is a retrieval model: use the caption form to rank images")
        question = _typed_text(question, "question", "type a question about the image")
        image = decode_upload(data, self.max_pixels)
        with self.lock:
            explanation = self.predictor.explain(image, question)
        return {
            **explanation.as_dict(),
            "task": self.predictor.model.task,
            "image": _png_data_url(Image.fromarray(explanation.image)),
            "overlays": {method: _png_data_url(explanation.overlay(method)) for method in explanation.maps},
        }


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "umd-serve"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # one short line per request on stderr
            sys.stderr.write(
                f"[umd serve] {self.command} {urlparse(self.path).path} {args[1] if len(args) > 1 else ''}\n"
            )

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, app.page, "text/html; charset=utf-8")
            elif path == "/api/health":
                self._json(HTTPStatus.OK, {"status": "ok", "task": app.predictor.model.task})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path not in ("/api/answer", "/api/score"):
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {url.path}"})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "the upload has no Content-Length"})
                return
            if int(length) > app.max_upload_bytes:
                self.close_connection = True  # the body is not read
                size, limit = int(length) / 2**20, app.max_upload_bytes / 2**20
                message = f"the file is {size:.1f} MB, more than the {limit:g} MB this server takes"
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": message})
                return
            data = self.rfile.read(int(length))
            query = parse_qs(url.query)
            try:
                if url.path == "/api/score":
                    self._json(HTTPStatus.OK, app.score(data, query.get("caption", [""])[0]))
                else:
                    self._json(HTTPStatus.OK, app.answer(data, query.get("question", [""])[0]))
            except BadInput as exc:
                self._json(exc.status, {"error": str(exc)})
            except Exception as exc:  # keep serving; the page shows what went wrong
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the model failed on this input: {exc}"})

    return Handler


def build_server(
    predictor: Any,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving; call ``serve_forever``). ``port=0`` picks a free port."""
    app = App(predictor, int(max_upload_mb * 2**20), max_pixels)
    server = ThreadingHTTPServer((host, port), make_handler(app))
    server.daemon_threads = True
    return server


def _checkpoint_task(path: Path) -> str | None:
    from umd_lightning.weights import load_checkpoint_file

    return (load_checkpoint_file(path).get("hyper_parameters") or {}).get("task")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``umd serve``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="umd serve",
        description="A local web page to ask a fine-tuned model about your own images (PNG, JPEG, DICOM), with its "
        "answer, top-5 and explanation overlays; or, for a retrieval model, to rank images by a caption.",
    )
    parser.add_argument(
        "model",
        help="an export folder (python -m umd_lightning.export CKPT FOLDER), a VQA / classification .ckpt, or a "
        "retrieval fine-tuning .ckpt (the page then ranks uploaded images by a caption)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload accepted")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image accepted")
    args = parser.parse_args(argv)

    from umd_lightning.errors import ConfigError
    from umd_lightning.predict import Predictor

    path = Path(args.model)
    if not path.exists():
        print(f"umd serve: error: no export folder or checkpoint at {path}", file=sys.stderr)
        return 2
    try:
        if path.is_file() and _checkpoint_task(path) == "retrieval":
            from umd_lightning.serve.retrieval import RetrievalScorer

            predictor = RetrievalScorer.from_checkpoint(path)
        else:
            predictor = Predictor.from_checkpoint(path) if path.is_file() else Predictor.from_export(path)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"umd serve: error: {exc}", file=sys.stderr)
        return 2
    server = build_server(predictor, args.host, args.port, args.max_upload_mb, args.max_pixels)
    host, port = server.server_address[:2]
    print(f"[umd serve] {predictor.model.task} model from {path} on http://{host}:{port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
