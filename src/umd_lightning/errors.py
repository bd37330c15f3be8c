"""Exceptions that mean "the configuration or the files given are wrong": the ``umd`` command prints them as one
line that says what to change, instead of a traceback."""


class ConfigError(ValueError):
    """A setting or a referenced file is wrong; the message names it and says what to change."""


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
