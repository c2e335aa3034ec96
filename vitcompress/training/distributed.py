"""The process group of a fine-tune under ``torchrun`` (DistributedDataParallel), from torchrun's environment.

``torchrun`` (``torch.distributed.run``) starts the processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous variables; this module only reads them, opens the default process group
(gloo on CPU, nccl on CUDA) and offers the few collectives the pipeline needs: an average, and a check that
every rank holds the same model (a hash of its weights, compared across ranks). Without torchrun (or with one
process) everything here is a no-op, so the same code runs alone.

A leaf: torch and :mod:`vitcompress.errors` only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vitcompress.errors import RecipeError, VitCompressError


class RankMismatchError(VitCompressError):
    """The ranks of a distributed run disagree (models, or inputs that must be the same everywhere)."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: its rank, the number of processes, and the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that exports, validates and writes files."""
        return self.rank == 0


def from_env(cuda: bool = False) -> Dist:
    """This process's place in a torchrun job, read from the environment torchrun sets (one process without);
    ``cuda``: the job trains on GPUs (nccl, one per process), else on CPUs (gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                backend="nccl" if cuda else "gloo")


def setup(cuda: bool = False) -> Dist:
    """Open the default process group for a torchrun job (once per process) and return this rank's place."""
    place = from_env(cuda)
    if place.enabled and not dist.is_initialized():
        if place.backend == "nccl":
            torch.cuda.set_device(place.local_rank)
        dist.init_process_group(place.backend)
    return place


def teardown() -> None:
    """Close the default process group, if this process opened one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(place: Dist) -> torch.device | None:
    """The CUDA device of this rank under nccl (one GPU per process), None otherwise."""
    return torch.device("cuda", place.local_rank) if place.backend == "nccl" else None


def weights_hash(model: nn.Module) -> bytes:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


def check_identical(model: nn.Module, place: Dist, when: str) -> None:
    """Raise :class:`RankMismatchError` on every rank unless every rank holds the same weights as rank 0.

    Rank 0's hash is broadcast; each rank compares its own, and the verdicts are gathered so that all ranks
    stop together (a rank that went on alone would wait for the others forever)."""
    if not place.enabled:
        return
    device = device_for(place) or torch.device("cpu")
    mine = torch.frombuffer(bytearray(weights_hash(model)), dtype=torch.uint8).to(device)
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differs = torch.tensor([int(not torch.equal(mine, reference))], device=device)
    verdicts = [torch.zeros_like(differs) for _ in range(place.world_size)]
    dist.all_gather(verdicts, differs)
    bad = [rank for rank, v in enumerate(verdicts) if v.item()]
    if bad:
        raise RankMismatchError(f"{when}, the model of rank(s) {', '.join(map(str, bad))} differs from rank 0's "
                                "(a transform or the data is not deterministic across processes)")


def mean(values: torch.Tensor, place: Dist) -> torch.Tensor:
    """The average over ranks of ``values`` (a copy; ``values`` itself when running alone)."""
    if not place.enabled:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / place.world_size


def check_global_batch(global_batch: int, world_size: int) -> None:
    """``finetune.batch_size`` is the global batch: it must divide evenly among ``world_size`` processes (checked
    before anything loads, and again where the batches are made)."""
    if global_batch % world_size:
        raise RecipeError(f"finetune.batch_size {global_batch} is the global batch and does not divide among "
                          f"{world_size} processes: use a multiple of {world_size}")
