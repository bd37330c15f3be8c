"""MELINDA: ``{train,dev,test}.csv`` and ``melinda_images/`` (DATA.md, "Downstream classification")."""

from __future__ import annotations

from pathlib import Path

from umd_lightning.data.common import OnError, check_label_column, check_text, safe_join
from umd_lightning.data.files import read_csv_rows, require_files
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanReport, add_report, scan

MELINDA_LABEL_COLUMNS = ("i_meth", "p_meth", "i_meth_label", "p_meth_label")


def melinda_records(
    root: str | Path,
    *,
    label_column: str = "p_meth_label",
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
) -> list[Record]:
    """MELINDA: ``train.csv``, ``dev.csv``, ``test.csv`` (``figure_file``, ``caption`` and the label columns)
    with images in ``melinda_images/``.

    Args:
        label_column: one of ``i_meth``, ``p_meth``, ``i_meth_label``, ``p_meth_label`` (default, 7 classes).

    Raises:
        ValueError: unknown label column (named).
        DataError: a CSV without a required column (named; kind ``missing_column``), whatever ``on_error``.
        FileNotFoundError: a split file is missing.
    """
    check_label_column("melinda", label_column, MELINDA_LABEL_COLUMNS)
    root = Path(root)
    files = {"train": "train.csv", "val": "dev.csv", "test": "test.csv"}
    require_files(root, files.values(), "melinda")
    records: list[Record] = []
    for split, name in files.items():
        file = root / name
        _, rows = read_csv_rows(file, ("figure_file", "caption", label_column))

        def parse(item: tuple[int, dict[str, str]], file: Path = file, split: str = split) -> Record:
            number, row = item
            figure = row.get("figure_file")
            record_id = figure or f"line {number}"
            return Record(
                id=record_id,
                image=safe_join(root / "melinda_images", figure, file=file, record=record_id),
                texts=(check_text(row.get("caption"), file=file, record=record_id, what="caption"),),
                label_name=check_text(row.get(label_column), file=file, record=record_id, what=label_column),
                split=split,
            )

        numbered = list(enumerate(rows, start=2))  # line 1 is the header
        kept, report = scan(numbered, parse, name=f"melinda/{split}", on_error=on_error, progress=False)
        add_report(reports, report)
        records += kept
    return records
