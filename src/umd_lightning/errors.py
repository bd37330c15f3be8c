"""Exceptions that mean "the configuration or the files given are wrong": the ``umd`` command prints them as one
line that says what to change, instead of a traceback."""


class ConfigError(ValueError):
    """A setting or a referenced file is wrong; the message names it and says what to change."""
