"""Batching for pre-training and TD-Calib: images, tokens and whole-word text masking (UMD_SPEC 2.1).

Masking lives here, not in the model, so a batch carries both the clean ``input_ids`` (teacher, ITM) and the
masked ``mlm_input_ids`` with their ``mlm_labels``. Image patch masking is the model's job (it depends on the
patch grid).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from umd_lightning.losses import IGNORE_INDEX


def whole_word_mask(
    word_ids: Sequence[int | None],
    special_mask: torch.Tensor | Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose whole words of one sequence until about ``ratio`` of its maskable tokens are covered.

    A token is maskable when it belongs to a word (``word_ids[i] is not None``, so padding and tokenizer-added
    special tokens are not) and ``special_mask[i]`` is 0. Words are taken in a random order; a word that would
    overshoot the target ``max(1, round(ratio * maskable))`` is passed over unless nothing is chosen yet, so
    at least one word is masked whenever the sequence has a maskable token and ``ratio > 0``. All sub-tokens
    of a chosen word are chosen (consecutive tokens with the same word id form one word, as a fast tokenizer's
    ``word_ids()`` reports them for WordPiece and BPE alike).

    Args:
        word_ids: ``(L,)`` word index of each token, ``None`` for special and padding tokens.
        special_mask: ``(L,)`` 1 at special tokens (``return_special_tokens_mask``), 0 elsewhere.
        ratio: fraction of the maskable tokens to cover, in [0, 1].
        generator: the random source (a fixed one makes the choice reproducible).

    Returns:
        ``BoolTensor (L,)``, True at the chosen tokens.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    special = torch.as_tensor(special_mask, dtype=torch.bool)
    if special.shape != (len(word_ids),):
        raise ValueError(f"special_mask has shape {tuple(special.shape)}, expected ({len(word_ids)},)")
    words: list[list[int]] = []
    previous: int | None = None
    for position, word in enumerate(word_ids):
        if word is None or special[position]:
            previous = None
            continue
        if word == previous and words:
            words[-1].append(position)
        else:
            words.append([position])
        previous = word
    chosen = torch.zeros(len(word_ids), dtype=torch.bool)
    maskable = sum(len(word) for word in words)
    if maskable == 0 or ratio == 0.0:
        return chosen
    target = max(1, round(ratio * maskable))
    covered = 0
    for index in torch.randperm(len(words), generator=generator).tolist():
        if covered >= target:
            break
        word = words[index]
        if covered and covered + len(word) > target:
            continue
        chosen[word] = True
        covered += len(word)
    return chosen


class PretrainCollator:
    """Turn a list of samples into a pre-training batch, masking whole words of the text.

    Output (``B`` kept samples, ``L`` the longest tokenised text in the batch, at most ``max_length``)::

        pixel_values   FloatTensor (B, 3, H, W)
        input_ids      LongTensor  (B, L)   clean tokens (teacher pass, ITM)
        attention_mask LongTensor  (B, L)   1 at real tokens, 0 at padding
        mlm_input_ids  LongTensor  (B, L)   input_ids with the chosen tokens replaced (80% mask token,
                                            10% a random non-special token, 10% unchanged)
        mlm_labels     LongTensor  (B, L)   the original id at chosen tokens, -100 elsewhere
        ids            list[str]            sample ids
        texts          list[str]            sample texts (before tokenisation)

    ``None`` samples (images that stopped decoding under ``on_error="skip"``) are dropped. A batch in which
    every sample is ``None`` gives ``None`` rather than an error, so a skip policy never stops a run; the
    stage's step should return ``None`` for it (Lightning then skips that optimiser step).

    Randomness: a ``torch.Generator`` private to each process, seeded from ``seed`` (or, when ``seed`` is
    None, from torch's global RNG, which ``seed_everything`` controls), mixed with the DataLoader worker's
    seed and the distributed rank, so workers and ranks draw different masks and a seeded run is reproducible.
    With ``fixed_masks=True`` the generator is instead re-seeded for every batch from ``seed`` and the batch's
    ids and texts: the same batch always gets the same masks (for comparable validation losses across epochs).

    Args:
        tokenizer: a fast Hugging Face tokenizer (``word_ids()`` is needed) with a mask token.
        max_length: texts are truncated to this many tokens, special tokens included.
        mask_ratio_text: fraction of each text's maskable tokens to mask.
        whole_word: mask all sub-tokens of a word together; ``False`` treats every token as its own word.
        seed: seed of the masking generator.
        fixed_masks: derive each batch's masks from its content (see above).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 64,
        mask_ratio_text: float = 0.15,
        whole_word: bool = True,
        seed: int | None = None,
        fixed_masks: bool = False,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"PretrainCollator needs a fast tokenizer (for word_ids()), got {type(tokenizer).__name__}")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} needs a mask token and a padding token")
        if not 0.0 <= mask_ratio_text <= 1.0:
            raise ValueError(f"mask_ratio_text must be in [0, 1], got {mask_ratio_text}")
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mask_ratio_text = mask_ratio_text
        self.whole_word = whole_word
        self.seed = seed
        self.fixed_masks = fixed_masks
        special = set(tokenizer.all_special_ids)
        self.random_token_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
        self._generator: torch.Generator | None = None
        self._generator_owner: tuple[Any, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker gets a pickled copy: it must seed its own generator, not inherit the parent's
        # state.
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_generator_owner"] = None
        return state

    def _process_generator(self) -> torch.Generator:
        worker = torch.utils.data.get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        owner = (os.getpid(), None if worker is None else (worker.id, worker.seed), rank)
        if self._generator is None or owner != self._generator_owner:
            base = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            worker_seed = 0 if worker is None else worker.seed
            mixed = (base * 1_000_003 + worker_seed * 10_007 + rank) % (2**63 - 1)
            self._generator = torch.Generator().manual_seed(mixed)
            self._generator_owner = owner
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        """This process's masking generator state (``None`` before the first batch), so a training loader that
        collates in the main process can save it in a checkpoint and a resumed run draws the same masks."""
        return {"generator": None if self._generator is None else self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the masking stream saved by :meth:`state_dict` in this process."""
        if state_dict.get("generator") is not None:
            self._process_generator().set_state(state_dict["generator"])

    def _batch_generator(self, ids: Sequence[str], texts: Sequence[str]) -> torch.Generator:
        digest = zlib.crc32("\x1f".join([*ids, *texts]).encode("utf-8"))
        return torch.Generator().manual_seed(((self.seed or 0) << 32) + digest)

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        kept = [sample for sample in samples if sample is not None]
        if not kept:
            return None
        images = [sample["image"] for sample in kept]
        if not all(isinstance(image, torch.Tensor) for image in images):
            raise TypeError("PretrainCollator needs tensor images: give the dataset an image transform")
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"images of one batch must share a shape, got {sorted(shapes)}")
        texts = [sample["text"] for sample in kept]
        ids = [str(sample["id"]) for sample in kept]
        encoding = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        input_ids = encoding["input_ids"]
        generator = self._batch_generator(ids, texts) if self.fixed_masks else self._process_generator()
        chosen = torch.zeros_like(input_ids, dtype=torch.bool)
        for row in range(len(kept)):
            word_ids = encoding.word_ids(row)
            if not self.whole_word:
                word_ids = [None if word is None else position for position, word in enumerate(word_ids)]
            chosen[row] = whole_word_mask(
                word_ids, encoding["special_tokens_mask"][row], self.mask_ratio_text, generator
            )
        mlm_input_ids, mlm_labels = self.corrupt(input_ids, chosen, generator)
        return {
            "pixel_values": torch.stack(images),
            "input_ids": input_ids,
            "attention_mask": encoding["attention_mask"],
            "mlm_input_ids": mlm_input_ids,
            "mlm_labels": mlm_labels,
            "ids": ids,
            "texts": texts,
        }

    def corrupt(
        self, input_ids: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply BERT's 80/10/10 replacement at the chosen positions.

        Args:
            input_ids: ``LongTensor (B, L)``.
            chosen: ``BoolTensor (B, L)``, the positions to predict.
            generator: the random source.

        Returns:
            ``(mlm_input_ids, mlm_labels)``, both ``LongTensor (B, L)``; labels are -100 where not chosen.
        """
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = chosen & (draw < 0.8)
        to_random = chosen & (draw >= 0.8) & (draw < 0.9)
        corrupted = input_ids.masked_fill(to_mask, self.tokenizer.mask_token_id)
        picks = torch.randint(len(self.random_token_ids), input_ids.shape, generator=generator)
        corrupted = torch.where(to_random, self.random_token_ids[picks], corrupted)
        return corrupted, labels
