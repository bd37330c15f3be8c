"""VQA answer normalisation and the answer vocabulary (UMD_SPEC 5).

Every answer is normalised once, when its record is read, so the vocabulary, the targets and the scoring all
compare the same strings.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path

ARTICLES = frozenset({"a", "an", "the"})

_PUNCTUATION = re.escape(string.punctuation)
# A punctuation mark with a digit on both sides belongs to a number ("3.5", "1,000", "10-20") and is kept.
_PUNCT_OUTSIDE_NUMBERS = re.compile(rf"(?<!\d)[{_PUNCTUATION}]|[{_PUNCTUATION}](?!\d)")
_DECIMAL = re.compile(r"\d+\.\d+")


def _canonical_number(word: str) -> str:
    """A decimal word without trailing zeros after the point (``2.0`` -> ``2``, ``2.50`` -> ``2.5``); any other
    word as it is."""
    if _DECIMAL.fullmatch(word):
        return word.rstrip("0").rstrip(".")
    return word


def normalize_answer(text: str | int | float) -> str:
    """Normalise a VQA answer for the vocabulary and for scoring.

    Lower-case; apostrophes dropped (``patient's`` -> ``patients``); every other punctuation mark becomes a
    space unless it sits between two digits (``3.5``, ``1,000`` and ``10-20`` keep theirs, ``yes.`` ->
    ``yes``, ``x-ray`` -> ``x ray``); whitespace collapsed; the articles ``a``, ``an``, ``the`` dropped,
    unless the answer is nothing but articles (then it is kept as it is, so no answer normalises to an empty
    string). ``"None"`` -> ``"none"``: a valid answer. Numbers (VQA-RAD stores some answers as JSON integers)
    become their decimal text, and every decimal number loses its trailing zeros, so ``2``, ``2.0`` and the
    string ``"2.0"`` are one answer (``2``), as are ``2.50`` and ``2.5``. The function is idempotent.

    Raises:
        TypeError: ``text`` is not a string or a number (``None`` and booleans included).
        ValueError: ``text`` is a NaN or infinite number (JSON's ``NaN`` / ``Infinity`` literals).
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise TypeError(f"an answer must be a string or a number, got {text!r}")
    if isinstance(text, float):
        if not math.isfinite(text):
            raise ValueError(f"answer {text!r} is not a finite number")
        # Whole floats as integers (1e20 -> 100000000000000000000, not "1e+20"), others in plain notation.
        text = str(int(text)) if text.is_integer() else format(Decimal(repr(text)), "f")
    lowered = str(text).lower().replace("'", "").replace("\u2019", "")
    words = [_canonical_number(word) for word in _PUNCT_OUTSIDE_NUMBERS.sub(" ", lowered).split()]
    kept = [word for word in words if word not in ARTICLES]
    return " ".join(kept or words)


class AnswerVocab:
    """An ordered list of normalised answers with an index, the label space of the VQA head.

    Args:
        answers: distinct normalised answers; their order gives the class ids.

    Raises:
        ValueError: an answer appears twice.
    """

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self._index = {answer: i for i, answer in enumerate(self.answers)}
        if len(self._index) != len(self.answers):
            repeated = sorted(a for a, n in Counter(self.answers).items() if n > 1)
            raise ValueError(f"answer vocabulary has repeated entries: {repeated[:10]}")

    @classmethod
    def from_answers(cls, answers: Iterable[str]) -> AnswerVocab:
        """Build a vocabulary from (normalised) answers, most frequent first, ties in text order."""
        counts = Counter(answers)
        return cls(sorted(counts, key=lambda answer: (-counts[answer], answer)))

    def index(self, answer: str) -> int | None:
        """The class id of a normalised answer, or ``None`` when it is outside the vocabulary."""
        return self._index.get(answer)

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return answer in self._index

    def __getitem__(self, index: int) -> str:
        return self.answers[index]

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as a JSON list of strings (class id = position)."""
        Path(path).write_text(json.dumps(self.answers, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> AnswerVocab:
        """Read a vocabulary written by :meth:`save`.

        Raises:
            ValueError: the file does not hold a JSON list of strings.
        """
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise ValueError(f"{path}: an answer vocabulary must be a JSON list of strings")
        return cls(data)
