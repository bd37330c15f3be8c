"""A fine-tuned retrieval model for ``umd serve``: the cross-encoder score of a caption against an image.

Retrieval models have no export format (:class:`~umd_lightning.hub.UMDInferenceModel` holds VQA and
classification heads), so ``umd serve`` loads their fine-tuning checkpoint (``torch.load(weights_only=True)``, no
pickled code) and the page ranks the images the user uploads by their score for a typed caption.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from umd_lightning.data.transforms import image_transform


class RetrievalScorer:
    """Scores (image, caption) pairs with a fine-tuned ``FineTune(task="retrieval")`` model.

    Attributes:
        task: ``"retrieval"`` (what the web page reads).
    """

    task = "retrieval"

    def __init__(self, stage: torch.nn.Module) -> None:
        from umd_lightning.models.text import load_tokenizer

        self.stage = stage.eval()
        self.model = self  # the page asks ``predictor.model.task``
        cfg = stage.backbone_config
        self.tokenizer = load_tokenizer(cfg.text.name_or_path)
        self.transform = image_transform(cfg.image_size, train=False)
        self.max_length = int((stage.hparams.get("data_card") or {}).get("max_text_length") or 40)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> RetrievalScorer:
        """Load a retrieval fine-tuning checkpoint.

        Raises:
            StageError: missing / unreadable file, or not a retrieval fine-tuning checkpoint (one line).
        """
        from umd_lightning.errors import StageError
        from umd_lightning.stages.finetune import FineTune
        from umd_lightning.weights import load_checkpoint_file

        checkpoint = load_checkpoint_file(path)
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        if checkpoint.get("umd_stage") != "finetune" or hparams.get("task") != "retrieval":
            raise StageError(f"{path} is not a retrieval fine-tuning checkpoint")
        stage = FineTune(**{**hparams, "pretrained": None})
        stage.load_state_dict(checkpoint["state_dict"], strict=True)
        return cls(stage)

    @torch.no_grad()
    def score(self, image: Image.Image, caption: str) -> float:
        """The model's match score of ``caption`` for ``image`` (higher: a better match)."""
        pixels = self.transform(image.convert("RGB")).unsqueeze(0)
        tokens = self.tokenizer([caption], truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.stage.backbone(pixels, tokens["input_ids"], tokens["attention_mask"])
        return float(self.stage.head(out.pooled).float().reshape(-1)[0])
