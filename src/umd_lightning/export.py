"""Export a UMD checkpoint as a folder that loads without unpickling anything.

``python -m umd_lightning.export runs/.../best.ckpt exported/`` (or :func:`export_model`) writes::

    exported/
      model.safetensors   every tensor of the checkpoint's state_dict (EMA teacher included for pre-training)
      config.json         stage, task, outputs and their names, backbone config, image size, text model,
                          maximum text length, leak notes, the stage's hyper-parameters
      text/               the tokenizer and the text tower's transformers config (JSON only), so the folder
                          needs neither the original text-model folder nor the network

:meth:`umd_lightning.predict.Predictor.from_export` loads a fine-tuned export back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from umd_lightning.models.config import resolve_text_model
from umd_lightning.models.text import load_tokenizer
from umd_lightning.stages.base import StageError, load_checkpoint_file
from umd_lightning.vocabulary import VOCABULARY_CHECKSUM_KEY, check_vocabulary, vocabulary_checksum

EXPORT_FORMAT = "umd_lightning.export/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_FOLDER = "text"


def default_max_length(task: str | None) -> int:
    """Texts are truncated to this many tokens when the export does not say (the data modules' defaults)."""
    return 32 if task == "vqa" else 128


def _json_safe(value: Any) -> Any:
    """``value`` if it survives a JSON round trip unchanged in meaning, else its ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def export_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    max_text_length: int | None = None,
    trust_pickle: bool | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``text/`` for a UMD checkpoint of any stage.

    Args:
        checkpoint: a Lightning checkpoint written by a UMD stage.
        out_dir: the export folder (created; existing files of the same names are replaced).
        max_text_length: tokens kept per question or caption at prediction time; ``None``: 32 for VQA, else 128
            (the data modules' defaults; pass the training run's ``data.max_text_length`` if it differed).
        trust_pickle: see :func:`umd_lightning.stages.base.load_checkpoint_file`.

    Returns:
        ``out_dir``.

    Raises:
        StageError: the file is not a UMD checkpoint, or cannot be read safely.
    """
    source = load_checkpoint_file(checkpoint, trust_pickle)
    stage = source.get("umd_stage")
    if stage is None or "umd_backbone_config" not in source:
        raise StageError(f"{checkpoint} is not a UMD checkpoint (no umd_stage / umd_backbone_config entries)")
    hparams = dict(source.get("hyper_parameters", {}))
    backbone = json.loads(json.dumps(source["umd_backbone_config"]))
    text_model = backbone["text"]["name_or_path"]
    task = hparams.get("task")

    out = Path(out_dir)
    text_dir = out / TEXT_FOLDER
    text_dir.mkdir(parents=True, exist_ok=True)
    load_tokenizer(text_model).save_pretrained(text_dir)
    resolved = resolve_text_model(text_model)
    AutoConfig.from_pretrained(resolved, local_files_only=Path(resolved).is_dir()).save_pretrained(text_dir)
    # The export is self-contained: the text tower is rebuilt from text/ and every weight comes from the file.
    backbone["text"].update(name_or_path=TEXT_FOLDER, pretrained=False)
    backbone["vision"].update(pretrained_path=None, pretrained_hub=False)

    # safetensors refuses tensors sharing memory (tied weights): store a copy of each.
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in source["state_dict"].items()}
    metadata = {"format": "pt", "umd_stage": stage, VOCABULARY_CHECKSUM_KEY: vocabulary_checksum(hparams.get("labels"))}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=metadata)
    config = {
        "format": EXPORT_FORMAT,
        "stage": stage,
        "task": task,
        "num_outputs": hparams.get("num_outputs"),
        "labels": hparams.get("labels"),
        "leak_notes": hparams.get("leak_notes"),
        "image_size": backbone["image_size"],
        "text_model": text_model,
        "max_text_length": max_text_length if max_text_length is not None else default_max_length(task),
        "backbone": backbone,
        "preset": hparams.get("preset"),
        "global_step": source.get("global_step"),
        "hyper_parameters": _json_safe(hparams),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def read_export_config(out_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an export folder, after checking that ``model.safetensors`` opens and was written
    for the same labels (the vocabulary checksum in its metadata).

    Raises:
        FileNotFoundError: no ``config.json`` or ``model.safetensors`` in the folder.
        ValueError: a file that does not parse (named; truncated or edited), a folder written by another exporter
            or format version, or labels that differ from the weights' (``VocabularyMismatchError``).
    """
    folder = Path(out_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a UMD export: {name} is missing")
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        config = json.loads(config_file.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{config_file} is not valid JSON ({str(exc)[:160]}); export the model again") from exc
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_file} has format {found!r}, expected {EXPORT_FORMAT!r}")
    try:
        with safe_open(str(weights_file), framework="pt") as weights:
            metadata = weights.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{weights_file} is not a readable safetensors file (truncated or corrupt: {exc}); export the model again"
        ) from exc
    stored = metadata.get(VOCABULARY_CHECKSUM_KEY)
    check_vocabulary(config.get("labels"), stored, config=config_file, weights=weights_file)
    return config


def main(argv: list[str] | None = None) -> None:
    """``python -m umd_lightning.export CHECKPOINT OUT_DIR [--max-text-length N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m umd_lightning.export",
        description="Export a UMD checkpoint as model.safetensors + config.json + text/ (no pickle needed to load).",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by a UMD stage")
    parser.add_argument("out_dir", help="the export folder")
    parser.add_argument("--max-text-length", type=int, default=None, help="tokens per text at prediction time")
    args = parser.parse_args(argv)
    try:
        out = export_model(args.checkpoint, args.out_dir, args.max_text_length)
    except StageError as exc:  # an unreadable, unsafe or non-UMD checkpoint, named in one line
        parser.exit(2, f"umd export: error: {exc}\n")
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
