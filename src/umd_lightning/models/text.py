"""The BERT-family text tower and its tokenizer, loaded by ``transformers`` Auto classes (UMD_SPEC 1.1)."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast

from umd_lightning.errors import ConfigError
from umd_lightning.models.config import TextConfig, resolve_text_model
from umd_lightning.models.dropout import use_cheap_dropout, use_cheap_text_attention
from umd_lightning.models.linear import use_onednn_linear


def _resolve(name_or_path: str) -> tuple[str, bool]:
    """The resolved path, and whether it is a local folder (which must never reach the network)."""
    path = resolve_text_model(name_or_path)
    return path, Path(path).is_dir()


@contextlib.contextmanager
def _offline_hint(name_or_path: str) -> Iterator[None]:
    """Turn transformers' "not found / offline" errors into one line that says what to do."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(
            f"text model {name_or_path!r} could not be loaded ({str(exc).strip().splitlines()[0]}): give a local "
            "folder (e.g. one written by save_pretrained), the alias 'minilm', or a hub name with network access"
        ) from exc


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a text model (a local folder, the ``minilm`` alias or a hub name).

    Raises:
        ValueError: the model has no fast tokenizer (whole-word masking needs ``word_ids()``).
    """
    path, local = _resolve(name_or_path)
    with _offline_hint(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{name_or_path!r} has no fast tokenizer; whole-word masking needs word_ids()")
    return tokenizer


def _usable_positions(config) -> int | None:
    """The longest input the position table allows; RoBERTa-style models offset positions by ``pad_token_id + 1``
    (514 positions -> 512 tokens)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer"):
        positions -= (config.pad_token_id or 0) + 1
    return positions


class RowGradEmbedding(nn.Embedding):
    """A word-embedding table whose gradient, on the CPU, is built from the rows that were looked up.

    PyTorch's dense embedding backward allocates and zero-fills a new (vocabulary x width) tensor at every call:
    47 MB for MiniLM, twice per MR-Pretrain step (the masked pass and the ITM pass). Fresh memory is slow to touch
    on a CPU (50-80 ms per call on a 2-core CI machine), so that fill was about a tenth of a `small` step. Here
    the lookup gives autograd a sparse gradient (the rows used) and a hook adds it into one dense gradient tensor
    kept from step to step, so that the optimiser, DDP, clipping and GM-Coord still see the usual dense ``.grad``.
    ``sparse`` stays ``False``: DDP reads it to decide how to reduce the gradient, and what it reduces is dense.

    Weights, state-dict keys and gradient values are those of ``nn.Embedding``. On a GPU (whose caching
    allocator makes the dense backward cheap), under ``torch.compile`` and without gradients it is the plain
    lookup. The dense gradient tensor is reused: a reference kept to one step's ``weight.grad`` sees the next
    step's values.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._dense_grad: Tensor | None = None
        # A weak reference, not the Parameter itself: nn.Module.__setattr__ would register a Parameter as a
        # second parameter (an extra state-dict key), and deepcopy keeps a weakref pointing at the original, so a
        # copied table hooks its own weight.
        self._hooked: weakref.ref | None = None

    @classmethod
    def like(cls, table: nn.Embedding) -> RowGradEmbedding:
        """The same table (its very weight ``Parameter``) with this lookup."""
        new = cls(
            table.num_embeddings,
            table.embedding_dim,
            padding_idx=table.padding_idx,
            max_norm=table.max_norm,
            norm_type=table.norm_type,
            scale_grad_by_freq=table.scale_grad_by_freq,
            _weight=table.weight,
            _freeze=not table.weight.requires_grad,
        )
        new.weight = table.weight
        return new

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight
        if (
            weight.device.type != "cpu"
            or not (weight.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling()
        ):
            return super().forward(input)
        if self._hooked is None or self._hooked() is not weight:  # a new Parameter (assigned or copied): hook once
            weight.register_post_accumulate_grad_hook(self._densify)
            self._hooked = weakref.ref(weight)
        return F.embedding(
            input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, sparse=True
        )

    def _densify(self, weight: Tensor) -> None:
        # Runs after each accumulation into weight.grad, before DDP's own hook reads it. The first lookup's
        # gradient of a step arrives sparse (autograd keeps it as .grad); every later one is added in place into
        # the dense tensor put there below.
        grad = weight.grad
        if grad is None or not grad.is_sparse:
            return
        dense = self._dense_grad
        if dense is None or dense.shape != weight.shape or dense.dtype != grad.dtype or dense.device != grad.device:
            dense = self._dense_grad = torch.zeros_like(weight, dtype=grad.dtype)
        else:
            dense.zero_()
        dense.add_(grad)
        weight.grad = dense


class TextTower(nn.Module):
    """Any encoder ``transformers.AutoModel`` loads, without its pooler.

    Args:
        cfg: which model, pretrained or random, and config overrides. The overrides apply in both cases (a
            pretrained model accepts those that keep the weight shapes, such as dropout rates).

    Attributes:
        encoder: the transformers model.
        width: hidden size.
        vocab_size: the embedding table's size.
        max_positions: the longest input its position embeddings allow (``None``: no absolute limit).
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        path, local = _resolve(cfg.name_or_path)
        with _offline_hint(cfg.name_or_path):
            config = AutoConfig.from_pretrained(path, local_files_only=local, **cfg.overrides)
        # A pooler's parameters would get no gradient (DDP complains): skip it where the class allows.
        model_class = MODEL_MAPPING[type(config)]
        kwargs = (
            {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
        )
        if cfg.pretrained:
            from umd_lightning.quiet import quiet_text_loading

            with quiet_text_loading():  # no report about the pooler left out above
                self.encoder = AutoModel.from_pretrained(path, config=config, local_files_only=local, **kwargs)
        else:
            self.encoder = AutoModel.from_config(config, **kwargs)
        # Dropout masks drawn 3-4x faster on a CPU (models/dropout.py); no weight or state-dict key changes.
        use_cheap_text_attention(self.encoder)
        use_cheap_dropout(self.encoder)
        use_onednn_linear(self.encoder)  # CPU fp32 products on oneDNN (models/linear.py)
        table = self.encoder.get_input_embeddings()
        if type(table) is nn.Embedding:
            self.encoder.set_input_embeddings(RowGradEmbedding.like(table))
        self.width: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.max_positions: int | None = _usable_positions(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token features.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1 / True for real tokens.

        Returns:
            (B, L, width) last hidden state.
        """
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
