"""MedICaT: the figures JSONL, its radiology filter and the held-out split (DATA.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from umd_lightning.data.common import DataError, OnError, safe_join
from umd_lightning.data.datasets import MIN_WORDS, PairDataset, Transform
from umd_lightning.data.files import (
    _parse_all,
    _require_file,
    canonical_split,
    clean_text,
    collapse_whitespace,
    string_field,
)
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanMode

log = logging.getLogger(__name__)


MEDICAT_ANNOTATIONS = "release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"


def medicat_holdout_size(num_figures: int, holdout: int = 1000) -> int:
    """Figures held out for each of val and test: ``holdout``, scaled down to 10% of a small file's figures.

    ``min(holdout, num_figures // 10)``, with 1 instead of 0 for 3 to 9 figures, so a tiny file still has a
    val and a test split (the paper's 1,000 + 1,000 need 10,000 figures or more). ``holdout=0`` puts every
    figure in train.
    """
    scaled = num_figures // 10 if num_figures >= 10 or num_figures < 3 else 1
    return min(holdout, scaled)


class MedicatDataset(PairDataset):
    """MedICaT: ``<root>/release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl``.

    One figure per line, image ``<root>/release/figures/<pdf_hash>_<fig_uri>``. Texts: ``s2_caption`` and each
    entry of ``s2orc_references`` (may be null) with at least ``min_words`` words; each text is one pair.

    There is no official split: the figures that pass the ``radiology`` filter and parse are sorted by id and
    shuffled with ``seed``; the first ``medicat_holdout_size(n, holdout)`` are val, the next as many test, the
    rest train (DATA.md: 1,000 val and 1,000 test). The split depends only on the annotation file, ``seed``
    and ``holdout``, never on which images fail the scan. Lines that do not parse are reported in every split;
    figures left out by ``radiology_only`` are in no split and only logged.

    Args:
        root: the folder holding ``release/``.
        split: ``train``, ``val`` or ``test``.
        transform: applied to the RGB PIL image.
        on_error: ``raise`` or ``skip`` bad records.
        scan: how deeply images are checked at set-up.
        radiology_only: keep only figures whose ``radiology`` field is ``true``.
        seed: seed of the hold-out shuffle.
        holdout: figures held out for each of val and test (scaled down for small files, see above).
        min_words: in-text references with fewer words are not used.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        radiology_only: bool = True,
        seed: int = 0,
        holdout: int = 1000,
        min_words: int = MIN_WORDS,
    ) -> None:
        super().__init__(name=f"medicat/{split}", transform=transform, on_error=on_error, scan_mode=scan)
        root = Path(root)
        canonical = canonical_split(
            split, {"train": "train", "val": "val", "validation": "val", "test": "test"}, "medicat"
        )
        annotations = _require_file(root / MEDICAT_ANNOTATIONS, "MedICaT annotations")
        parsed = _parse_all(annotations)

        def figure_id(record: dict[str, Any]) -> str | None:
            pdf_hash, fig_uri = record.get("pdf_hash"), record.get("fig_uri")
            if isinstance(pdf_hash, str) and isinstance(fig_uri, str):
                return f"{pdf_hash}_{fig_uri}"
            return None

        eligible: dict[str, None] = {}
        left_out = 0
        for _, record in parsed:
            if isinstance(record, DataError) or figure_id(record) is None:
                continue
            if radiology_only and record.get("radiology") is not True:
                left_out += 1
                continue
            eligible[figure_id(record)] = None
        if left_out:
            log.info("medicat: %d figures are not radiology and are left out (radiology_only=True)", left_out)
        order = sorted(eligible)
        shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
        size = medicat_holdout_size(len(order), holdout)
        splits = {"val": shuffled[:size], "test": shuffled[size : 2 * size], "train": shuffled[2 * size :]}
        chosen = set(splits[canonical])
        items = [
            (line, record)
            for line, record in parsed
            if isinstance(record, DataError) or figure_id(record) is None or figure_id(record) in chosen
        ]

        def make_record(item: tuple[int, dict[str, Any] | DataError]) -> Record:
            line, record = item
            if isinstance(record, DataError):
                raise record
            pdf_hash = string_field(record, "pdf_hash", file=annotations, line=line)
            fig_uri = string_field(record, "fig_uri", file=annotations, line=line)
            name = f"{pdf_hash}_{fig_uri}"
            texts = [clean_text(record.get("s2_caption"), file=annotations, record=name, what="s2_caption")]
            references = record.get("s2orc_references") or []
            if not isinstance(references, list):
                raise DataError("bad_record", annotations, name, "s2orc_references must be a list or null")
            for reference in references:
                if not isinstance(reference, str):
                    raise DataError("bad_record", annotations, name, f"s2orc reference {reference!r} is no string")
                reference = collapse_whitespace(reference)
                if len(reference.split()) >= min_words:
                    texts.append(reference)
            path = safe_join(root, f"release/figures/{name}", file=annotations, record=name)
            return Record(id=name, image=path, file=str(annotations), texts=tuple(texts))

        self._load(items, make_record)
