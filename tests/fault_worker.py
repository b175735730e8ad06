"""One rank of a `star-mcore generate` job started without a launcher (as srun starts ranks), for the
reliability tests. ``FAULT_RANK``/``FAULT_AT`` (test-only) make that rank raise in its Nth request;
``FAULT_SIGTERM=1`` makes it send itself SIGTERM there instead (a scheduler's stop at a known point)."""

from __future__ import annotations

import os
import signal
import sys

from star_mcore.cli.main import main
from star_mcore.inference import engine as engine_mod

fault_rank = int(os.environ.get("FAULT_RANK", "-1"))
if int(os.environ["RANK"]) == fault_rank:
    calls = {"n": 0}
    original = engine_mod.Engine.query  # once per request (its query pass)

    def failing_query(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(os.environ.get("FAULT_AT", "2")):
            if os.environ.get("FAULT_SIGTERM") == "1":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError("injected fault")
        return original(self, *args, **kwargs)

    engine_mod.Engine.query = failing_query

sys.exit(main(sys.argv[1:]))
