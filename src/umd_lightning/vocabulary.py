"""A checksum of a model's output names (VQA answers or classes), stored with exported weights and checked on
loading: a ``config.json`` whose labels were edited or reordered would otherwise give wrong answer names
without a word. No Lightning or torch import: any exporter or loader can use it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

VOCABULARY_CHECKSUM_KEY = "umd_vocabulary_sha256"
"""Key of the checksum in the weights file's metadata (safetensors header)."""


def vocabulary_checksum(labels: Sequence[str] | None) -> str:
    """SHA-256 (hex) of the labels in order, as UTF-8 JSON; ``None`` (retrieval, pre-training) has its own value."""
    payload = json.dumps(None if labels is None else list(labels), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
