"""The one progress/log line format of every command (stderr, so results on stdout stay clean)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(f"[star-mcore] {msg}", file=sys.stderr, flush=True)
