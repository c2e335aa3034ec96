"""The fine-tune's training batches: one order for any number of processes, resumable, decoded in workers.

Every rank reads the train split through a :class:`~torch.utils.data.DistributedSampler` (seeded; reshuffled
per epoch), so the union of the ranks' batches at a step is the batch one process would take with the global
batch size: the recipe means the same thing at any scale. :class:`ResumableSampler` can start an epoch part
way through, which is how a resumed run sees exactly the batches an uninterrupted one would. Images are
decoded in ``workers`` DataLoader processes (persistent across epochs); an image that cannot be read is left
out of its batch and reported, instead of ending an hour-long run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vitcompress.deploy.cpus import available_cpus
from vitcompress.errors import DataError
from vitcompress.training.distributed import Dist, check_global_batch


class SkipUnreadable(Dataset):
    """``dataset`` whose unreadable items (a :class:`DataError` from ``__getitem__``) come back as
    ``(None, reason)`` for :func:`collate_readable` to drop."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except DataError as exc:
            return None, str(exc)


def collate_readable(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Stack the readable ``(image, label)`` items; also return why each unreadable one was dropped."""
    good = [item for item in items if item[0] is not None]
    skipped = [item[1] for item in items if item[0] is None]
    if not good:
        return None, None, skipped
    images = torch.stack([torch.as_tensor(image) for image, _ in good])
    labels = torch.as_tensor([int(label) for _, label in good], dtype=torch.long)
    return images, labels, skipped


class ResumableSampler(Sampler[int]):
    """This rank's share of a seeded :class:`DistributedSampler` epoch, optionally from its ``skip``-th batch on."""

    def __init__(self, inner: DistributedSampler, batch_size: int) -> None:
        self.inner = inner
        self.batch_size = batch_size
        self.skip = 0

    def start(self, epoch: int, skip_batches: int = 0) -> None:
        """The next iteration is ``epoch``'s, without its first ``skip_batches`` batches."""
        self.inner.set_epoch(epoch)
        self.skip = skip_batches

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip * self.batch_size:])

    def __len__(self) -> int:
        return len(self.inner) - self.skip * self.batch_size


def default_workers(place: Dist) -> int:
    """DataLoader workers per rank when the recipe names none: the cores that this node's training processes'
    compute threads leave free (of the CPUs this process may use: affinity mask and cgroup quota), shared
    among them."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", place.world_size if place.enabled else 1))
    free = available_cpus() - torch.get_num_threads() * local_processes
    return max(0, free // local_processes)


@dataclass
class TrainBatches:
    """The loader, its sampler and the geometry of an epoch, for one rank."""

    loader: DataLoader
    sampler: ResumableSampler
    per_rank_batch: int
    batches_per_epoch: int
    workers: int

    def from_step(self, step: int) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, list[str]]]:
        """Batches forever, starting where ``step`` optimizer steps of this schedule would have left off."""
        epoch, skip = divmod(step, self.batches_per_epoch)
        while True:
            self.sampler.start(epoch, skip)
            yield from self.loader
            epoch, skip = epoch + 1, 0


def train_batches(dataset: Dataset, global_batch: int, place: Dist, seed: int, workers: int | None,
                  pin_memory: bool) -> TrainBatches:
    """Batches of this rank's share of ``dataset``: ``global_batch / world_size`` images each (at most the
    split's size), seeded by ``seed``, decoded in ``workers`` processes (None: :func:`default_workers`)."""
    check_global_batch(global_batch, place.world_size)
    per_rank = min(global_batch, len(dataset)) // place.world_size
    if per_rank == 0:
        raise DataError(f"the train split has {len(dataset)} images: too few for {place.world_size} processes")
    inner = DistributedSampler(dataset, num_replicas=place.world_size, rank=place.rank, shuffle=True, seed=seed,
                               drop_last=True)
    sampler = ResumableSampler(inner, per_rank)
    workers = default_workers(place) if workers is None else workers
    loader = DataLoader(SkipUnreadable(dataset), batch_size=per_rank, sampler=sampler, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                        collate_fn=collate_readable, generator=torch.Generator().manual_seed(seed))
    return TrainBatches(loader, sampler, per_rank, len(inner) // per_rank, workers)
