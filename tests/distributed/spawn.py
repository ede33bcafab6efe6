"""Run a function on N gloo ranks in spawned processes, bounded in time, failures re-raised."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # any collective that waits longer fails the test instead of hanging CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # success: leave without C++ static teardown, where gloo's threads can abort a clean run
    # ("terminate called without an active exception"); a failure above propagates as usual
    os._exit(0)


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, world, *args) on `world` processes; an exception on any rank fails the caller."""
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")
