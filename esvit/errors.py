"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class EsvitError(Exception):
    """Base class of the errors a user can fix (bad config, bad data, bad checkpoint)."""

    exit_code = 2


class ConfigError(EsvitError, ValueError):
    """A configuration that is malformed (unknown key, wrong type) or cannot work (crop smaller than a patch)."""


class DataError(EsvitError):
    """A data directory that is missing, empty or unreadable, or an image that cannot be decoded."""


class CheckpointError(EsvitError):
    """A checkpoint that is missing, unreadable or of another architecture."""


class TrainingError(EsvitError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is kept."""

    exit_code = 1
