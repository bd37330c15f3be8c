"""Export a fine-tuned UMD checkpoint as a Hub-ready folder (:class:`~umd_lightning.hub.UMDInferenceModel`).

``python -m umd_lightning.export runs/.../best.ckpt exported/ [--push-to-hub user/name]`` (or :func:`export_model`)
writes ``model.safetensors``, ``config.json``, ``text/`` and a generated ``README.md`` model card;
``Predictor.from_export("exported/")`` and ``UMDInferenceModel.from_pretrained("exported/")`` load it without
unpickling anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from umd_lightning.errors import ConfigError
from umd_lightning.hub import UMDInferenceModel
from umd_lightning.weights import load_checkpoint_file


def export_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    max_text_length: int | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """Write the inference folder of a fine-tuned checkpoint.

    Args:
        checkpoint: a Lightning checkpoint of a UMD ``FineTune`` run (VQA or classification).
        out_dir: the folder (created; files of the same names are replaced).
        max_text_length: tokens kept per question or caption; ``None``: the training data's, else 32 for VQA and
            128 for classification.
        push_to_hub: also upload the folder to this hub repository (needs network access and a token).

    Returns:
        ``out_dir``.

    Raises:
        StageError: missing file, or one that cannot be read safely.
        ExportError: not a fine-tuned VQA / classification checkpoint.
    """
    source = load_checkpoint_file(checkpoint)
    if source.get("umd_stage") != "finetune":
        raise ConfigError(
            f"{checkpoint} is a {source.get('umd_stage') or 'non-UMD'} checkpoint; only fine-tuned VQA or "
            "classification checkpoints export as an inference model"
        )
    model = UMDInferenceModel.from_checkpoint(checkpoint, max_text_length=max_text_length)
    out = Path(out_dir)
    model.save_pretrained(out, push_to_hub=push_to_hub is not None, repo_id=push_to_hub)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m umd_lightning.export CHECKPOINT OUT_DIR [--max-text-length N] [--push-to-hub REPO]``."""
    parser = argparse.ArgumentParser(
        prog="python -m umd_lightning.export",
        description="Export a fine-tuned UMD checkpoint as a Hub-ready folder (safetensors, JSON, tokenizer, card).",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by a UMD fine-tuning run")
    parser.add_argument("out_dir", help="the export folder")
    parser.add_argument("--max-text-length", type=int, default=None, help="tokens per text at prediction time")
    parser.add_argument("--push-to-hub", default=None, help="also upload to this hub repository (network)")
    args = parser.parse_args(argv)
    try:
        out = export_model(args.checkpoint, args.out_dir, args.max_text_length, args.push_to_hub)
    except ConfigError as exc:
        parser.exit(2, f"umd export: error: {exc}\n")
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
