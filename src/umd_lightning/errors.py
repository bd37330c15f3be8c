"""Every exception of the package, in one module.

``ConfigError`` (and its subclasses) means "the configuration or the files given are wrong": the ``umd`` command
prints them as one line that says what to change, instead of a traceback. ``DataError`` names one record of a data
set; the weights errors name one weights file. Nothing here imports the rest of the package, so every module can
raise them.
"""

from __future__ import annotations

import re
from pathlib import Path


class ConfigError(ValueError):
    """A setting or a referenced file is wrong; the message names it and says what to change."""


class StageError(ConfigError):
    """A configuration or checkpoint mistake, with a one-line message that says what to change."""


class NonFiniteLossError(StageError):
    """A loss term turned NaN or infinite; the message names the step and the term."""


class DiskFullError(ConfigError):
    """A checkpoint could not be written because its disk (or quota) is full; the message names the file."""


class OutputFolderError(ConfigError):
    """An output folder cannot be created or written; found before the first training step."""


class RunFolderInUseError(ConfigError):
    """Another run holds the lock of this run folder."""


class ExportError(ConfigError):
    """An exported folder that cannot be loaded as it is; the message names the file."""


class ConversionError(ConfigError):
    """A reference checkpoint that cannot be converted; the message names the key or the file."""


class DataError(ValueError):
    """A problem with one record of a data set, naming the file and record at fault.

    Attributes:
        kind: a short category used for counting (``missing_image``, ``bad_image``, ``empty_text``, ...).
        file: the annotation or image file at fault.
        record: the record's id (or line number) in that file.
        reason: what is wrong, in words.
    """

    def __init__(
        self, kind: str, file: str | Path | None = None, record: str | int | None = None, reason: str | None = None
    ) -> None:
        if file is None and reason is None:
            # One argument: a whole message. A DataLoader worker's exception is re-raised in the main process as
            # ``type(error)(traceback text)``; this keeps it a DataError (kind read from the trailing "[kind]").
            found = re.search(r"\[(\w+)\]\s*$", kind)
            self.kind, self.file, self.record, self.reason = found[1] if found else "data_error", "", None, kind
            super().__init__(kind)
            return
        self.kind = kind
        self.file = str(file)
        self.record = record
        self.reason = str(reason)
        where = f"{self.file}" + (f", record {record}" if record is not None else "")
        super().__init__(f"{where}: {reason} [{kind}]")

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, str | int | None, str]]:
        # Pickled with its fields (processes, DataLoader workers), not with the formatted message.
        return type(self), (self.kind, self.file, self.record, self.reason)


class UntrustedPickleError(RuntimeError):
    """A weights file holds Python objects that only full unpickling (which can run code) would restore."""


class UnreadableWeightsError(RuntimeError):
    """A weights file is truncated, corrupt or not a weights file at all (no pickle setting would help)."""


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise a one-line :class:`ConfigError` naming the option ``name`` and its valid range when ``value`` is outside
    it (``low_open`` / ``high_open`` exclude the bound itself)."""
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        bounds = (
            f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}"
        )
        raise ConfigError(f"{name}={value} is outside its valid range {bounds}")
