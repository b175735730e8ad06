"""Errors a user caused and can fix: the CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """Base of the one-line errors."""


class ConfigError(UserError, ValueError):
    """A bad configuration, found before any work starts (the same on every rank)."""


class RunError(UserError, RuntimeError):
    """Something about the run (not one request) that stops it: checkpoint, input file, world size..."""


def unreadable(path: object, e: BaseException) -> RunError:
    """A file that is there but cannot be read: one line naming it and the first sentence of the reader's error
    (torch's next sentences advise loading the file with pickle's full powers, wrong for a damaged file)."""
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return RunError(f"{path}: cannot be read ({type(e).__name__}{': ' + first if first else ''})")
