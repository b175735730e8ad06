"""The watchdog's wait after a failed collective: it lasts while a peer is going silent (so the verdict, not
a race, decides who is named) and ends at once when every peer is alive (the failure is this rank's own)."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

from distributed import free_port
from star_mcore.parallel.watchdog import Watchdog


@pytest.fixture
def store(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=30),
                           wait_for_workers=False)
    yield dist.PrefixStore("star_mcore/health/", master)


def _watchdog(child_s: float) -> Watchdog:
    """Rank 0 of 2 whose 'watchdog process' is a stand-in that lives ``child_s`` seconds."""
    w = Watchdog(0, 2, interval_s=0.05, stale_after_s=30.0)
    w.pid = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({child_s})"]).pid
    return w


def test_wait_returns_when_every_peer_is_alive(store):
    stop = threading.Event()

    def beat():
        n = 0
        while not stop.is_set():
            n += 1
            store.set("hb/1", str(n))
            time.sleep(0.02)

    t = threading.Thread(target=beat)
    t.start()
    w = _watchdog(child_s=120)
    try:
        w.wait_for_verdict()
        assert os.waitpid(w.pid, os.WNOHANG)[0] == 0  # it returned on its own, the watchdog still running
    finally:
        stop.set()
        t.join()
        os.kill(w.pid, 9)
        os.waitpid(w.pid, 0)


@pytest.mark.parametrize("announced", [False, True])
def test_wait_lasts_until_the_verdict_while_a_peer_is_silent(store, announced):
    store.set("hb/1", "7")  # beat once, then never again (killed)
    if announced:
        store.set("first_failure", "1")
        store.add("failures", 1)
    w = _watchdog(child_s=1.5)  # its 'verdict': the watchdog ends (the real one ends this process too)
    t0 = time.monotonic()
    w.wait_for_verdict()
    assert time.monotonic() - t0 >= 1.0  # not before the watchdog was gone ...
    with pytest.raises(ChildProcessError):
        os.waitpid(w.pid, os.WNOHANG)  # ... which the wait saw (it reaped the process)
