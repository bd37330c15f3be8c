"""Whole-word masking and the pre-training collate, with a real WordPiece and a local BPE tokenizer."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from umd_lightning.data.collate import IGNORE_INDEX, PretrainCollator, whole_word_mask
from umd_lightning.models.config import resolve_text_model

MEDICAL_WORDS = ("pneumothorax", "cardiomegaly", "hydronephrosis", "lymphadenopathy")
LONG_TEXT = (
    "Frontal and lateral views of the chest demonstrate a small right apical pneumothorax without "
    "mediastinal shift. There is mild cardiomegaly. Bilateral hydronephrosis is noted on the prior study, "
    "and there is mediastinal lymphadenopathy. The osseous structures are intact and no acute fracture is "
    "identified."
)


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(resolve_text_model("minilm"), local_files_only=True)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A RoBERTa-style byte-level BPE trained here on a few sentences (none of MEDICAL_WORDS is in them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    sentences = [
        "The chest radiograph shows a small right apical opacity.",
        "No pleural effusion is seen and the heart size is normal.",
        "There is mild pulmonary edema with the lungs otherwise clear.",
        "The osseous structures are intact and no acute fracture is identified.",
    ]
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(sentences, trainer=trainer)
    model.post_processor = processors.RobertaProcessing(
        ("</s>", model.token_to_id("</s>")), ("<s>", model.token_to_id("<s>"))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


@pytest.fixture(params=["wordpiece", "bpe"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(request.param)


def samples(texts: list[str], size: int = 8) -> list[dict]:
    return [{"image": torch.full((3, size, size), float(i)), "text": t, "id": f"s{i}"} for i, t in enumerate(texts)]


def word_groups(word_ids: list[int | None]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for position, word in enumerate(word_ids):
        if word is not None:
            groups.setdefault(word, []).append(position)
    return groups


# --- whole_word_mask alone ----


def test_whole_word_mask_takes_words_whole_and_skips_specials() -> None:
    # [CLS] w0 w0 w0 w1 w2 w2 [SEP] pad pad: 6 maskable tokens in 3 words.
    word_ids = [None, 0, 0, 0, 1, 2, 2, None, None, None]
    special = [1, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    seen = set()
    for seed in range(200):
        chosen = whole_word_mask(word_ids, special, 0.15, torch.Generator().manual_seed(seed))
        assert not chosen[[0, 7, 8, 9]].any()
        for positions in ([1, 2, 3], [4], [5, 6]):
            assert chosen[positions].all() or not chosen[positions].any()
        # target = max(1, round(0.9)) = 1 token: exactly one word, the first one drawn, whatever its length.
        assert chosen.any()
        seen.add(tuple(chosen.nonzero().flatten().tolist()))
    assert seen == {(1, 2, 3), (4,), (5, 6)}


def test_whole_word_mask_hits_the_target_with_single_token_words() -> None:
    word_ids = [None, *range(40), None]
    special = [1] + [0] * 40 + [1]
    for seed in range(20):
        chosen = whole_word_mask(word_ids, special, 0.15, torch.Generator().manual_seed(seed))
        assert int(chosen.sum()) == 6  # round(0.15 * 40)


def test_whole_word_mask_edge_cases() -> None:
    assert not whole_word_mask([None, None], [1, 1], 0.15).any()
    assert not whole_word_mask([None, 0, 1, None], [1, 0, 0, 1], 0.0).any()
    # special_mask wins over a word id (a special token written in the text).
    assert whole_word_mask([None, 0, None], [1, 1, 1], 1.0).sum() == 0
    assert whole_word_mask([None, 0, 0, 1, None], [1, 0, 0, 0, 1], 1.0).tolist() == [
        False,
        True,
        True,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="mask ratio"):
        whole_word_mask([0], [0], 1.5)
    with pytest.raises(ValueError, match="shape"):
        whole_word_mask([0, 1], [0], 0.5)


# --- the collator with real tokenizers ----


def test_medical_words_split_into_several_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    for word in MEDICAL_WORDS:
        assert len(tokenizer.tokenize(" " + word)) > 1, (word, tokenizer.tokenize(" " + word))


def test_words_are_never_split(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [f"a {w} b" for w in MEDICAL_WORDS] + [LONG_TEXT]
    encoding = tokenizer(texts, padding="longest", truncation=True, max_length=64)
    groups = [word_groups(encoding.word_ids(row)) for row in range(len(texts))]
    hit_multi_token_word = 0
    for seed in range(60):
        batch = PretrainCollator(tokenizer, max_length=64, seed=seed)(samples(texts))
        assert torch.equal(batch["input_ids"], torch.tensor(encoding["input_ids"]))
        chosen = batch["mlm_labels"] != IGNORE_INDEX
        for row, row_groups in enumerate(groups):
            assert chosen[row].any()
            for positions in row_groups.values():
                picked = chosen[row, positions]
                assert picked.all() or not picked.any(), (seed, row, positions, picked)
                hit_multi_token_word += int(len(positions) > 1 and bool(picked.all()))
    assert hit_multi_token_word > 20  # the property was exercised on split words, not only on one-token words


def test_specials_and_padding_never_chosen(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = ["tiny", LONG_TEXT, "a b c d e f g h i j"]
    collator = PretrainCollator(tokenizer, max_length=32, mask_ratio_text=0.5, seed=0)
    for _ in range(30):
        batch = collator(samples(texts))
        assert batch["input_ids"].shape == (3, 32)  # padded to the longest, which is truncated at max_length
        special = torch.tensor(
            [tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in batch["input_ids"]]
        ).bool()
        chosen = batch["mlm_labels"] != IGNORE_INDEX
        assert not (chosen & special).any()
        assert not (chosen & (batch["attention_mask"] == 0)).any()
        assert (batch["attention_mask"][0] == 0).any()  # the short text was padded


def test_ratio_close_to_fifteen_percent_on_long_texts(tokenizer: PreTrainedTokenizerFast) -> None:
    text = " ".join([LONG_TEXT] * 3)
    collator = PretrainCollator(tokenizer, max_length=256, seed=1)
    batch = collator(samples([text] * 64))
    special = torch.tensor(
        [tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in batch["input_ids"]]
    ).bool()
    maskable = (batch["attention_mask"].bool() & ~special).sum(dim=1)
    chosen = (batch["mlm_labels"] != IGNORE_INDEX).sum(dim=1)
    ratio = (chosen / maskable).float()
    assert ratio.min() >= 0.12 and ratio.max() <= 0.17, ratio
    assert abs(ratio.mean().item() - 0.15) < 0.01


def test_labels_and_80_10_10_split(tokenizer: PreTrainedTokenizerFast) -> None:
    collator = PretrainCollator(tokenizer, max_length=128, mask_ratio_text=1.0, seed=3)
    batch = collator(samples([LONG_TEXT] * 150))
    chosen = batch["mlm_labels"] != IGNORE_INDEX
    assert torch.equal(batch["mlm_labels"][chosen], batch["input_ids"][chosen])
    assert (batch["mlm_labels"][~chosen] == IGNORE_INDEX).all()
    assert torch.equal(batch["mlm_input_ids"][~chosen], batch["input_ids"][~chosen])
    total = int(chosen.sum())
    assert total > 5000
    masked = batch["mlm_input_ids"][chosen] == tokenizer.mask_token_id
    kept = batch["mlm_input_ids"][chosen] == batch["input_ids"][chosen]
    replaced = ~masked & ~kept
    # binomial standard deviations: 0.4% for 80%, 0.3% for 10% at n > 5000; tolerances are about 4 of them.
    assert abs(masked.float().mean().item() - 0.8) < 0.02
    assert abs(kept.float().mean().item() - 0.1) < 0.015
    assert abs(replaced.float().mean().item() - 0.1) < 0.015
    random_tokens = batch["mlm_input_ids"][chosen][replaced]
    assert not torch.isin(random_tokens, torch.tensor(tokenizer.all_special_ids)).any()


def test_token_level_masking_when_whole_word_is_off(wordpiece: PreTrainedTokenizerFast) -> None:
    texts = [f"{w} {w} {w}" for w in MEDICAL_WORDS]
    collator = PretrainCollator(wordpiece, mask_ratio_text=0.15, whole_word=False, seed=0)
    encoding = wordpiece(texts, padding="longest")
    split_words = 0
    for _ in range(30):
        chosen = collator(samples(texts))["mlm_labels"] != IGNORE_INDEX
        for row in range(len(texts)):
            for positions in word_groups(encoding.word_ids(row)).values():
                split_words += int(0 < int(chosen[row, positions].sum()) < len(positions))
    assert split_words > 0


# --- batch contents, None handling, determinism ----


def test_batch_keys_shapes_and_none_samples(wordpiece: PreTrainedTokenizerFast) -> None:
    collator = PretrainCollator(wordpiece, max_length=16, seed=0)
    items = samples(["first text here", "second text"])
    batch = collator([items[0], None, items[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["pixel_values"][1, 0, 0, 0].item() == 1.0
    assert batch["ids"] == ["s0", "s1"]
    assert batch["texts"] == ["first text here", "second text"]
    for key in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert batch[key].shape == batch["input_ids"].shape and batch[key].dtype == torch.long
    assert collator([None, None]) is None


def test_collator_rejects_bad_inputs(wordpiece: PreTrainedTokenizerFast) -> None:
    collator = PretrainCollator(wordpiece)
    with pytest.raises(TypeError, match="image transform"):
        collator([{"image": object(), "text": "a b c", "id": "x"}])
    mixed = samples(["a b c"], size=8) + samples(["a b c"], size=4)
    with pytest.raises(ValueError, match="share a shape"):
        collator(mixed)
    with pytest.raises(ValueError, match="mask_ratio_text"):
        PretrainCollator(wordpiece, mask_ratio_text=2.0)


def test_seeded_masks_are_reproducible(wordpiece: PreTrainedTokenizerFast) -> None:
    texts = [LONG_TEXT] * 8
    first = PretrainCollator(wordpiece, seed=5)(samples(texts))
    again = PretrainCollator(wordpiece, seed=5)(samples(texts))
    other = PretrainCollator(wordpiece, seed=6)(samples(texts))
    assert torch.equal(first["mlm_input_ids"], again["mlm_input_ids"])
    assert not torch.equal(first["mlm_labels"], other["mlm_labels"])
    # A generator that keeps running gives new masks on the next call.
    collator = PretrainCollator(wordpiece, seed=5)
    assert not torch.equal(collator(samples(texts))["mlm_labels"], collator(samples(texts))["mlm_labels"])


def test_fixed_masks_depend_only_on_the_batch(wordpiece: PreTrainedTokenizerFast) -> None:
    collator = PretrainCollator(wordpiece, seed=0, fixed_masks=True)
    batch = samples([LONG_TEXT, "another caption of a chest film"])
    assert torch.equal(collator(batch)["mlm_input_ids"], collator(batch)["mlm_input_ids"])


def test_dataloader_workers_draw_different_reproducible_masks(wordpiece: PreTrainedTokenizerFast) -> None:
    data = samples([LONG_TEXT] * 8)
    collator = PretrainCollator(wordpiece, seed=7)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)  # the DataLoader draws its worker seeds from the global RNG (seed_everything)
        loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=collator)
        return [batch["mlm_labels"] for batch in loader]

    first, second = run(), run()
    assert len(first) == 2
    # Batch 0 comes from worker 0, batch 1 from worker 1: same texts, different masks.
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
