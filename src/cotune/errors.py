"""Errors a user can fix: the CLI prints them as one paragraph and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad config, missing file, unknown name: something the user can correct.

    The message must say what was wrong and what would be valid. The CLI prints it
    without a traceback and exits with status 2.
    """


class ConfigError(UserError):
    """A config key or value is unknown or invalid."""


class DataError(UserError):
    """A data folder or file is missing or malformed."""


class ModelError(UserError):
    """A model name cannot be resolved or loaded."""


class ExportError(UserError):
    """A run folder cannot be exported (missing, or without saved weights)."""
