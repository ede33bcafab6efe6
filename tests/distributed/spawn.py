"""Run a function on N gloo ranks in spawned processes, bounded in time, failures re-raised."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

# any collective that waits longer fails the test instead of hanging CI; generous for a loaded 2-core
# box, yet under the tests' 240 s pytest timeout
TIMEOUT_S = 120


def _entry(rank, world, port, fn, args):
    import torch

    torch.set_num_threads(1)
    # a client of the caller's store: the port is bound already, so no other process can take it
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # success: leave without C++ static teardown, where gloo's threads can abort a clean run
    # ("terminate called without an active exception"); a failure above propagates as usual
    os._exit(0)


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, world, *args) on `world` processes; an exception on any rank fails the caller."""
    # the store server lives here, bound to port 0 (the OS picks a free one, atomically): no
    # probe-then-bind race with parallel test workers or other jobs on the machine
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=TIMEOUT_S))
    mp.start_processes(_entry, args=(world, store.port, fn, args), nprocs=world, join=True,
                       start_method="spawn")
