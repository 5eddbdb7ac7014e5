"""Ranks spawned by the test itself, as a user's script or torchrun does: no LiveCluster.

`run_ranks(fn, world_size, *args)` starts `world_size` fresh processes (spawn), each joins a
gloo process group (file rendezvous, a 60 s collective timeout), runs fn(*args) and hands back
what it returned; a rank that raises fails the test with its traceback, and a run that takes
longer than `timeout` seconds is killed and fails it too, so nothing here can hang.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _rank_main(rank, world_size, store, fn, args, results) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - handed to the test as text
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 240.0) -> list:
    """fn(*args) on each of `world_size` fresh ranks; the list of results, indexed by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, store, fn, args, results))
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        got: dict[int, tuple[bool, object]] = {}
        try:
            while len(got) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"ranks {sorted(set(range(world_size)) - set(got))} "
                        f"did not finish within {timeout} s"
                    )
                try:
                    rank, ok, value = results.get(timeout=min(left, 1.0))
                except queue_module.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead and len(got) < world_size:
                        time.sleep(1.0)  # let a failing rank's report arrive first
                        while not results.empty():
                            rank, ok, value = results.get()
                            got[rank] = (ok, value)
                        if len(got) < world_size:
                            raise RuntimeError(
                                f"a rank died: exit codes {[p.exitcode for p in procs]}"
                            ) from None
                    continue
                got[rank] = (ok, value)
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=10)
    failed = {r: v for r, (ok, v) in got.items() if not ok}
    if failed:
        raise AssertionError("\n".join(f"rank {r} raised:\n{v}" for r, v in failed.items()))
    return [got[r][1] for r in range(world_size)]
