"""One generation on N ranks of this machine: a process per rank, one process group (NCCL over
the GPUs, or gloo over CPU processes with `--device cpu`), every rank running the same call with
its `SequenceParallel` (`pusa_ray.sequence_parallel`). Used by `pusa-ray generate --gpus N`.

What can be checked before any process starts is (`check`), so that a bad request is one clear
line; a rank that fails ends the launch with the rank's own last error line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from pusa_ray.errors import UserInputError


def check(model: str, ranks: int, device: str | None, cache: str | None) -> None:
    """Refuse what cannot run on `ranks` ranks: heads that do not divide, too few GPUs, the cache."""
    import torch

    from pusa_ray.models.description import describe_model

    if ranks < 1:
        raise UserInputError(f"--gpus must be >= 1, got {ranks}")
    heads = describe_model(model).architecture["num_attention_heads"]
    if heads % ranks:
        raise UserInputError(
            f"--gpus {ranks}: {model} has {heads} attention heads, which {ranks} ranks must divide"
        )
    if cache not in (None, "off"):
        raise UserInputError("--cache: the step cache does not run sequence parallel (--gpus > 1) yet")
    if (device or "cuda").startswith("cuda") and torch.cuda.device_count() < ranks:
        found = torch.cuda.device_count()
        raise UserInputError(f"--gpus {ranks}: this machine has {found} GPUs (--device cpu runs CPU ranks)")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (the ranks' rendezvous; the tests' servers)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(function: Callable[..., None], ranks: int, device: str | None, *args: Any) -> None:
    """Run `function(parallel, device, *args)` on `ranks` spawned processes; wait for all."""
    import torch.multiprocessing as mp

    try:
        mp.start_processes(
            _rank, args=(ranks, free_port(), device, function, args), nprocs=ranks, start_method="spawn"
        )
    except mp.ProcessRaisedException as error:
        last = [line for line in str(error).strip().splitlines() if line.strip()][-1]
        raise UserInputError(f"a rank failed: {last}") from None


def _rank(
    rank: int, ranks: int, port: int, device: str | None, function: Callable[..., None], args: tuple
) -> None:
    import torch
    import torch.distributed as dist

    from pusa_ray.sequence_parallel import SequenceParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if (device or "cuda").startswith("cuda"):
        torch.cuda.set_device(rank)
        device, backend = f"cuda:{rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))  # the ranks share the cores
    dist.init_process_group(backend, rank=rank, world_size=ranks)
    try:
        function(SequenceParallel(rank, ranks), device, *args)
    finally:
        dist.destroy_process_group()
