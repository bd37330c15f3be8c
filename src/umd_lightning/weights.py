"""Reading weights without running pickled code (no Lightning import: the models use it too).

:func:`read_weights` reads ``.safetensors`` files with safetensors, TorchScript archives (OpenAI's CLIP files such
as ``ViT-B-16.pt``) with :func:`read_torchscript_state_dict`, and anything else with
``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused unless the caller opts in with
``trust_pickle=True`` or the environment variable ``UMD_TRUST_PICKLE=1``. A file that is merely broken (truncated,
empty, text, not a checkpoint at all) is reported as such, never as a pickle-safety refusal.

The package's readers, all here: :func:`read_weights` (whatever the file holds), :func:`read_state_dict` (a
tensor state dict, unwrapped from ``state_dict`` / ``model``: the vision tower's pretrained files) and
:func:`load_checkpoint_file` (a Lightning checkpoint dict, errors as :class:`StageError`: ``pretrained:``, export
and the Predictor).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from umd_lightning.errors import StageError, UnreadableWeightsError, UntrustedPickleError

TRUST_PICKLE_ENV = "UMD_TRUST_PICKLE"
"""Set to ``1`` to let :func:`read_weights` unpickle files that ``weights_only`` refuses (trusted files only)."""


def unreadable(path: str | Path, exc: BaseException) -> UnreadableWeightsError:
    """The one-line error for a broken weights file, with the reader's own reason in brackets."""
    text = str(exc).strip()
    reason = text.splitlines()[0].split(". ")[0][:160] if text and text != type(exc).__name__ else "ends early"
    return UnreadableWeightsError(
        f"{path} is not a readable checkpoint (truncated or corrupt: {type(exc).__name__}: {reason}); "
        "give an intact file, e.g. another checkpoint of the same run"
    )


def _first_pickle(path: Path) -> bytes:
    """The pickle stream ``torch.load`` would unpickle first: ``data.pkl`` of a zip checkpoint, else the file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name.endswith("data.pkl")]
            return archive.read(names[0]) if names else b""
    return path.read_bytes()


def is_wellformed_pickle(path: Path) -> bool:
    """Whether the file's (first) pickle stream parses to its end, read opcode by opcode without running any of
    it: a real pickle of Python objects does, a truncated or random file does not."""
    try:
        for _ in pickletools.genops(io.BytesIO(_first_pickle(path))):
            pass
    except Exception:  # any parse failure means "not a pickle": ValueError, EOFError, zipfile and UnicodeErrors
        return False
    return True


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
        UnreadableWeightsError: the file is truncated, corrupt or not a weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise unreadable(path, exc) from exc
    if torchscript_root(path) is not None:
        return read_torchscript_state_dict(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only refusal is an UnpicklingError; a broken file raises anything
        if not is_wellformed_pickle(path):
            raise unreadable(path, exc) from exc
        if not trusts_pickle(trust_pickle):
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            named = [line for line in lines if "Unsupported" in line]
            reason = (named or lines or [type(exc).__name__])[0]
            raise UntrustedPickleError(
                f"{path} holds Python objects that torch.load(weights_only=True) refuses ({reason}). Unpickling "
                f"can run arbitrary code: if you trust the file, set {TRUST_PICKLE_ENV}=1 (or pass "
                "trust_pickle=True), or re-save its state_dict with torch.save / as .safetensors"
            ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, KeyError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        # A well-formed first pickle whose data records are cut short; a class that cannot be imported
        # (AttributeError, ImportError) is left to say so itself.
        raise unreadable(path, exc) from exc


_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def torchscript_root(path: str | Path) -> str | None:
    """The archive folder of a TorchScript file (a zip with ``<root>/data.pkl`` and ``<root>/code/``), else ``None``."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    roots = {name.split("/")[0] for name in names if name.count("/") == 1 and name.endswith("/data.pkl")}
    return next((root for root in roots if any(n.startswith(f"{root}/code/") for n in names)), None)


class _ScriptModule:
    """Stands in for a pickled TorchScript module: its attributes are set from the pickle, no code runs."""


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


def read_torchscript_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a TorchScript archive under their module paths (``visual.conv1.weight`` ...), read without
    ``torch.jit.load``.

    A TorchScript file holds compiled code beside a pickle of the module tree. Loading it with ``torch.jit.load``
    would compile and keep that code; here only the pickle is read, by an unpickler that knows three things:
    TorchScript module classes (``__torch__.*``, replaced by an inert attribute holder), tensor rebuilding and
    ``OrderedDict``. Any other global is refused, so nothing from the file is ever executed.

    Raises:
        pickle.UnpicklingError: the pickle refers to anything else (named in the message).
    """
    root = torchscript_root(path)
    if root is None:
        raise ValueError(f"{path} is not a TorchScript archive")
    with zipfile.ZipFile(path) as archive:

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module == "__torch__" or module.startswith("__torch__."):
                    return _ScriptModule
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]
                raise pickle.UnpicklingError(f"{path}: the TorchScript pickle refers to {module}.{name}, refused")

            def persistent_load(self, pid: Any) -> Tensor:
                _kind, dtype, key, _location, _numel = pid
                data = bytearray(archive.read(f"{root}/data/{key}"))
                return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)

        with archive.open(f"{root}/data.pkl") as handle:
            tree = Unpickler(handle).load()
    state: dict[str, Tensor] = {}

    def walk(node: _ScriptModule, prefix: str) -> None:
        for name, value in vars(node).items():
            if isinstance(value, Tensor):
                state[prefix + name] = value
            elif isinstance(value, _ScriptModule):
                walk(value, f"{prefix}{name}.")

    walk(tree, "")
    return state


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict of tensors in a weights file, read by :func:`read_weights` (no pickled code runs).

    ``.safetensors`` files go through safetensors, TorchScript archives (OpenAI's ``ViT-B-16.pt``) through a
    restricted reader of their pickle, anything else through ``torch.load(weights_only=True)``, which refuses
    checkpoints holding arbitrary Python objects. A state dict nested under ``"state_dict"`` or
    ``"model"`` is unwrapped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UntrustedPickleError: the file needs more than tensors and plain containers to unpickle (the message says
            how to allow it for a trusted file).
        ValueError: the file holds no state dict.
    """
    state: Any = read_weights(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_checkpoint_file(path: str | Path, trust_pickle: bool | None = None) -> dict[str, Any]:
    """Read a Lightning checkpoint without unpickling arbitrary objects (``torch.load(weights_only=True)``).

    Args:
        path: the checkpoint.
        trust_pickle: allow full unpickling of a trusted file that ``weights_only`` refuses; ``None`` reads the
            ``UMD_TRUST_PICKLE`` environment variable (see :func:`umd_lightning.weights.read_weights`).

    Raises:
        StageError: the file is missing, truncated or corrupt, or it holds objects that need full unpickling and
            that was not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"pretrained checkpoint not found: {path} (check the `pretrained:` path)")
    try:
        checkpoint = read_weights(path, trust_pickle)
    except (UntrustedPickleError, UnreadableWeightsError) as exc:
        raise StageError(str(exc)) from exc
    if not isinstance(checkpoint, dict):
        raise StageError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict with a state_dict)")
    return checkpoint
