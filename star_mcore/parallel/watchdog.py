"""Turn a dead or failed rank into a prompt, named exit of every other rank, instead of a hang that lasts
until the collective timeout.

Each rank forks a small watchdog process before it starts CUDA or process groups (a thread would starve:
a rank blocked in a collective can hold the GIL). The watchdog bumps the rank's heartbeat counter in the
job's rendezvous store and watches the others: a rank whose counter stops moving for ``stale_after_s``
(killed, machine lost) or that reported a failure makes every other rank print one line naming it and
exit non-zero. Counters, not clocks, so hosts need no synchronised time.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
from typing import Optional

import torch.distributed as dist


def _store(timeout_s: float) -> dist.Store:
    """Our own connection to the job's rendezvous store (torchrun's agent, or rank 0, at MASTER_ADDR:PORT)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore("star_mcore/health/", store)


def _beats(store: dist.Store, rank: int) -> Optional[int]:
    """``rank``'s heartbeat count, None before its first beat."""
    return int(store.get(f"hb/{rank}").decode()) if store.check([f"hb/{rank}"]) else None


def _announce(store: dist.Store, rank: int, why: str) -> None:
    store.set(f"why/{rank}", why)
    store.compare_set("first_failure", "", str(rank))
    store.add("failures", 1)


class Watchdog:
    """Start with :meth:`start` before ``init_process_group``; :meth:`report_failure` from the rank's own
    error path; :meth:`stop` on every rank before the final barrier."""

    def __init__(self, rank: int, world: int, *, interval_s: float = 1.0, stale_after_s: float = 30.0) -> None:
        self.rank, self.world = rank, world
        self.interval_s, self.stale_after_s = interval_s, stale_after_s
        self.pid: Optional[int] = None

    def start(self) -> "Watchdog":
        if self.world == 1 or "MASTER_ADDR" not in os.environ:
            return self  # alone: nobody to watch
        parent = os.getpid()
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the watchdog process
            code = 0
            try:
                self._watch(parent)
            except BaseException:  # noqa: BLE001 - never let the child run the parent's code
                code = 1
            os._exit(code)
        self.pid = pid
        return self

    def report_failure(self, message: str) -> None:
        """Tell the other ranks why this one is about to exit."""
        if self.pid is None:
            return
        try:
            _announce(_store(5.0), self.rank, f"failed: {message}")
        except Exception:  # noqa: BLE001 - the store may be gone too; this rank exits anyway
            pass

    def wait_for_verdict(self) -> None:
        """After a failed collective: wait while the watchdog may still name a dead or failed peer (its verdict
        ends this process); return once it cannot, so this rank names itself.

        No fixed sleep (a loaded machine makes any fixed time a race): this returns only when no failure was
        announced and every live peer's heartbeat has moved since the wait began, i.e. no peer is going silent.
        A killed peer's counter never moves again, so the wait lasts until the watchdog's verdict. The bound
        (a few stale periods) only guards against a watchdog that is itself gone."""
        if self.pid is None:
            return
        deadline = time.monotonic() + 4 * self.stale_after_s + 10 * self.interval_s
        try:
            store = _store(self.stale_after_s)
            start = {r: _beats(store, r) for r in range(self.world) if r != self.rank}
            while time.monotonic() < deadline:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return  # the watchdog is gone: nobody will give a verdict
                if not store.add("failures", 0):
                    silent = [r for r, b in start.items()
                              if not store.check([f"done/{r}"]) and _beats(store, r) == b]
                    if not silent:
                        return  # every peer is alive: the failure is this rank's own
                time.sleep(self.interval_s)
        except Exception:  # noqa: BLE001 - the store is gone (rank 0 or the launcher died): the watchdog says so
            while time.monotonic() < deadline and not os.waitpid(self.pid, os.WNOHANG)[0]:
                time.sleep(self.interval_s)

    def stop(self) -> None:
        if self.pid is not None:
            try:
                _store(5.0).set(f"done/{self.rank}", "1")
            except Exception:  # noqa: BLE001
                pass
            os.kill(self.pid, signal.SIGUSR1)
            os.waitpid(self.pid, 0)
            self.pid = None

    def _watch(self, parent: int) -> None:
        signal.signal(signal.SIGUSR1, lambda *_: os._exit(0))  # the rank's stop()
        # Ctrl-C and a scheduler's SIGTERM go to the rank (which drains, then stops us); a watchdog that left
        # first would fall silent and get its rank named dead while it finishes its requests
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

        def verdict(msg: str, linger: bool = True) -> None:
            print(f"star-mcore: error: rank {self.rank}: stopping because {msg}", file=sys.stderr, flush=True)
            if linger:  # the store may live in this rank's process (rank 0): let the others read the verdict
                time.sleep(3 * self.interval_s)
            os.kill(parent, signal.SIGKILL)  # the rank may sit in a collective that will never complete
            os._exit(0)

        try:
            store = _store(self.stale_after_s)
        except Exception as e:  # noqa: BLE001
            verdict(f"the job's rendezvous store is unreachable: {type(e).__name__}", linger=False)
        beats, seen = 0, {}  # rank -> (heartbeat count, local time it last changed)
        while True:
            if os.getppid() != parent:
                os._exit(0)  # the rank is gone; its silence tells the others
            try:
                beats += 1
                store.set(f"hb/{self.rank}", str(beats))
                if store.add("failures", 0):
                    failed = int(store.get("first_failure").decode())
                    if failed != self.rank:
                        verdict(f"rank {failed} {store.get(f'why/{failed}').decode()}")
                now = time.monotonic()
                for r in range(self.world):
                    if r == self.rank or store.check([f"done/{r}"]):
                        continue
                    count = _beats(store, r)
                    if count is None:
                        continue  # not started yet: a rank that never starts fails the rendezvous instead
                    if seen.get(r, (None,))[0] != count:
                        seen[r] = (count, now)
                    elif now - seen[r][1] > self.stale_after_s:
                        why = (f"stopped responding (no heartbeat for {self.stale_after_s:.0f} s; "
                               "killed or its machine lost?)")
                        _announce(store, r, why)
                        verdict(f"rank {r} {why}")
            except Exception as e:  # noqa: BLE001 - the store's host (rank 0 or the launcher) is gone
                verdict(f"the job's rendezvous store is unreachable (rank 0 or the launcher died?): "
                        f"{type(e).__name__}", linger=False)
            time.sleep(self.interval_s)
