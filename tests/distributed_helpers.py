"""Running a test's worker in several spawned ranks of a `torch.distributed` process group (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Each collective gives up after this long, and each multi-process run after JOIN_SECONDS: a hang fails the test.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
JOIN_SECONDS = 240


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(worker, world_size: int, directory: Path, *args, backend: str = "gloo") -> list:
    """Run ``worker(rank, world_size, directory, *args)`` in ``world_size`` spawned processes; their JSON results.

    Each process starts in a process group initialised from a file store (with a bounded
    collective timeout) and with torchrun's environment variables set, for workers that close
    that group and initialise another one the way ``torchrun`` does.
    """
    port = _free_port()
    context = mp.start_processes(_rank_entry, args=(worker, world_size, str(directory), backend, port, args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_SECONDS
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"{world_size} ranks did not finish within {JOIN_SECONDS} s (a hang)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((directory / f"result_{rank}.json").read_text()) for rank in range(world_size)]


def _rank_entry(rank, worker, world_size, directory, backend, port, args):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (the GPU machines set it so)
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{directory}/store", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        result = worker(rank, world_size, Path(directory), *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (Path(directory) / f"result_{rank}.json").write_text(json.dumps(result))


def gpu_world_sizes() -> list:
    """World sizes of the multi-GPU tests: 2, and every GPU of the machine when there are more (the largest lent)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sizes = [2] + ([count] if count > 2 else [])
    return [pytest.param(size, id=f"{size}-gpus") for size in sizes]


def needs_gpus(world_size: int) -> None:
    """Skip the calling test unless this machine has ``world_size`` CUDA devices."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, this machine has {torch.cuda.device_count()}")
