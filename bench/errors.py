"""Errors a user can act on; the CLI prints their message without a traceback."""

from __future__ import annotations


class BenchError(Exception):
    """Base of every error that names what the user must fix."""


class DataError(BenchError):
    """Bad or missing data: the message names the dataset, file, sample or field."""


class DataWarning(UserWarning):
    """A recoverable defect in a dataset (the message names the file); the sample is repaired or skipped."""


class ConfigError(BenchError):
    """A bad option or combination of options, caught before any training starts."""


class NonFiniteLossError(BenchError):
    """A loss became NaN or infinite; training stops with the run marked FAILED."""
