"""``umd serve EXPORT_FOLDER``: a local web page to ask a fine-tuned model about your own images.

Upload a PNG, JPEG or DICOM image (DICOM through pydicom, its VOI LUT / window applied), type a question, and the
page shows the answer, the top-5 with their probabilities, and where the model looked (the attention rollout and
Grad-CAM overlays of :mod:`umd_lightning.explain`). See :mod:`umd_lightning.serve.app`.
"""

from umd_lightning.serve.app import DEFAULT_MAX_UPLOAD_MB, DEFAULT_PORT, build_server, decode_upload, main

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "DEFAULT_PORT", "build_server", "decode_upload", "main"]
