"""Real multi-rank runs on one CPU box: one spawned process per rank, gloo, results back through a queue."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import socket
import subprocess
import time
import traceback
from typing import Any, Callable, List


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port that binds now, chosen below the kernel's ephemeral range: a port the kernel handed out (port 0)
    can be handed out again to another process's outgoing connection (gloo opens many) before the rendezvous
    store binds it."""
    high = min(_ephemeral_low(), 32768)
    for _ in range(200 if high > 20000 else 0):
        port = random.randrange(20000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken, or no room below the range: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        q.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        q.put((rank, False, traceback.format_exc()))


def run_world(world: int, fn: Callable, *args: Any, timeout: float = 600) -> List[Any]:
    """Run ``fn(*args)`` on ``world`` ranks (env set as torchrun would); return each rank's result.

    ``fn`` must be importable (module level) and return picklable plain data. A world whose rendezvous port was
    taken between choosing and binding it is run again on another port (twice at most).
    """
    for _ in range(2):
        try:
            return _run_world_once(world, fn, args, timeout)
        except AssertionError as e:
            if "address already in use" not in str(e).lower():
                raise
    return _run_world_once(world, fn, args, timeout)


def _run_world_once(world: int, fn: Callable, args: tuple, timeout: float) -> List[Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, ok, value = q.get(timeout=timeout)
            (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
            if errors:
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for {world - len(results)} rank(s)")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def wait_all(procs, timeout: float) -> List[Any]:
    """Exit codes of ``procs`` ((Popen, its open stderr file) pairs) within ``timeout`` seconds for all of them;
    one still running then is killed and counts as None. The stderr files are closed."""
    deadline = time.monotonic() + timeout
    codes = []
    for p, err in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
        err.close()
    return codes
