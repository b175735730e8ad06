"""Errors a user caused and can fix: the CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """Base of the one-line errors."""


class ConfigError(UserError, ValueError):
    """A bad configuration, found before any work starts (the same on every rank)."""


class RunError(UserError, RuntimeError):
    """Something about the run (not one request) that stops it: checkpoint, input file, world size..."""
