"""Reading weights without running pickled code (no Lightning import: the models use it too).

:func:`read_weights` reads ``.safetensors`` files with safetensors and anything else with
``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused unless the caller opts in with
``trust_pickle=True`` or the environment variable ``UMD_TRUST_PICKLE=1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

TRUST_PICKLE_ENV = "UMD_TRUST_PICKLE"
"""Set to ``1`` to let :func:`read_weights` unpickle files that ``weights_only`` refuses (trusted files only)."""


class UntrustedPickleError(RuntimeError):
    """A weights file holds Python objects that only full unpickling (which can run code) would restore."""


def trusts_pickle(trust_pickle: bool | None = None) -> bool:
    """The effective opt-in: ``trust_pickle`` when given, else whether ``UMD_TRUST_PICKLE`` is ``1``."""
    if trust_pickle is not None:
        return trust_pickle
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def read_weights(path: str | Path, trust_pickle: bool | None = None) -> Any:
    """Load a ``.safetensors`` file (a dict of tensors) or a ``torch.save`` file without unpickling code.

    Args:
        path: the file.
        trust_pickle: allow full unpickling when ``weights_only`` refuses the file; ``None`` reads the
            ``UMD_TRUST_PICKLE`` environment variable. Only for files from a source you trust.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UntrustedPickleError: the file needs full unpickling and it was not allowed (the message says how).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and others, for globals outside the weights-only allow-list
        if not trusts_pickle(trust_pickle):
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UntrustedPickleError(
                f"{path} holds Python objects that torch.load(weights_only=True) refuses ({reason}). Unpickling "
                f"can run arbitrary code: if you trust the file, set {TRUST_PICKLE_ENV}=1 (or pass "
                "trust_pickle=True), or re-save its state_dict with torch.save / as .safetensors"
            ) from exc
    return torch.load(path, map_location="cpu", weights_only=False)
