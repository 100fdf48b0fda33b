"""Run a function on W spawned ranks of a gloo process group on CPU, with a hang guard."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[..., Any]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, worker: Worker, kwargs: dict, queue: Any) -> None:
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        try:
            # Plain pickle copies tensors by value; torch's queue pickler would share memory
            # that disappears when this process exits before the parent reads it.
            queue.put((rank, "ok", pickle.dumps(worker(rank, world_size, **kwargs))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the test, which fails with this rank's traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(worker: Worker, *, world_size: int = 2, timeout: float = 90.0, **kwargs: Any) -> list:
    """``[worker(rank, world_size, **kwargs) for each rank]``, run in parallel processes.

    Raises AssertionError with the failing rank's traceback, or if a rank does not finish
    within ``timeout`` seconds (a hang: a rank skipped or added a collective).
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_entry, args=(rank, world_size, port, worker, kwargs, queue))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, status, value = queue.get(timeout=timeout)
            except Exception as error:  # queue.Empty: some rank never answered
                raise AssertionError(
                    f"ranks {sorted(set(range(world_size)) - set(results))} did not finish "
                    f"within {timeout} s: a collective was probably skipped (hang)"
                ) from error
            if status != "ok":
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may now wait in a collective; stop them below
            results[rank] = pickle.loads(value)
    finally:
        for process in processes:
            process.join(timeout=1 if errors else 10)
            if process.is_alive():
                process.kill()
                process.join()
    assert not errors, "\n".join(errors)
    return [results[rank] for rank in range(world_size)]
