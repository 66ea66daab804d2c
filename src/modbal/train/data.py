"""Data loading for the runner: resumable, rank-sharded batch samplers and the val carve-out.

The training permutation of epoch ``e`` is a pure function of ``(seed, e)``, so a run resumed in
the middle of an epoch regenerates it and skips the batches already done. Under distributed
training each global batch (``batch_size`` samples, the same batches a single process sees) is
split into ``world_size`` equal contiguous shards, one per rank; DDP's gradient average over ranks
then equals the single-process mean over the global batch.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of indices for one rank; resumable with :meth:`set_epoch` ``(epoch, start)``.

    Args:
        n: dataset size. batch_size: the global batch size (all ranks together).
        shuffle: new permutation every epoch (seeded) or the natural order.
        rank, world_size: this process and the number of processes.
        drop_last: drop the last partial global batch. Otherwise it is kept, trimmed to a
            multiple of ``world_size`` so every rank gets an equal shard (nothing is trimmed in
            a single process).
    """

    def __init__(self, n: int | Sized, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        self.size, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    @property
    def n(self) -> int:
        """The number of examples: a fixed size, or the current length of a re-sampled set
        (:class:`ExampleSet`, whose examples a method may change between epochs)."""
        return len(self.size) if isinstance(self.size, Sized) else int(self.size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch``'s batches from batch number ``start`` on."""
        self.epoch, self.start = epoch, start

    def _global_batches(self) -> list[torch.Tensor]:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        batches = list(order.split(self.batch_size))
        if batches and len(batches[-1]) < self.batch_size:
            last = batches.pop()
            keep = 0 if self.drop_last else len(last) - len(last) % self.world_size
            if keep:
                batches.append(last[:keep])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for number in range(self.start, len(self._global_batches())):
            yield self.indices_of(number)

    def indices_of(self, batch: int) -> list[int]:
        """This rank's sample indices of batch number ``batch`` of the current epoch."""
        global_batch = self._global_batches()[batch]
        size = len(global_batch) // self.world_size
        return global_batch[self.rank * size:(self.rank + 1) * size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last and rest >= self.world_size else 0)


class ExampleSet(Subset):
    """The training split as a method re-samples it (:meth:`modbal.methods.base.Method.train_examples`):
    example i is sample ``indices[i]`` with an integer tag (0: as is). Items are ``(inputs, target,
    tag)``; :class:`TaggedCollate` puts the batch's tags into the inputs under
    :data:`~modbal.methods.base.EXAMPLE_TAG`. A ``Subset``, so sample numbers in error messages
    name the original sample."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, list(range(len(dataset))))
        self.base_size = len(dataset)
        self.tags: list[int] = [0] * self.base_size

    def set_examples(self, examples: Any) -> None:
        """Use ``examples`` (``indices`` and ``tags``, see :class:`~modbal.methods.base.Examples`), or
        every sample once, untagged, for None."""
        if examples is None:
            self.indices, self.tags = list(range(self.base_size)), [0] * self.base_size
            return
        indices = [int(i) for i in examples.indices]
        if indices and not 0 <= min(indices) <= max(indices) < self.base_size:
            raise ValueError(f"re-sampled examples name samples outside 0..{self.base_size - 1}")
        tags = [0] * len(indices) if examples.tags is None else [int(t) for t in examples.tags]
        if len(tags) != len(indices):
            raise ValueError(f"{len(indices)} re-sampled examples but {len(tags)} tags")
        self.indices, self.tags = indices, tags

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        inputs, target = self.dataset[self.indices[index]]
        return inputs, target, self.tags[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any, int]]:
        return [self[i] for i in indices]


class TaggedCollate:
    """Collates :class:`ExampleSet` items with the dataset's own collate function (default: torch's)
    and adds the batch's tags to the inputs."""

    def __init__(self, collate: Any = None) -> None:
        self.collate = collate

    def __call__(self, batch: list[tuple[Any, Any, int]]) -> tuple[dict[str, torch.Tensor], Any]:
        from torch.utils.data import default_collate

        from ..methods.base import EXAMPLE_TAG  # the methods import the training package lazily

        pairs = [(inputs, target) for inputs, target, _ in batch]
        inputs, targets = (self.collate or default_collate)(pairs)
        return {**inputs, EXAMPLE_TAG: torch.tensor([tag for _, _, tag in batch])}, targets


class EvalBatchSampler(Sampler[list[int]]):
    """Every sample exactly once over all ranks (rank r takes r, r+W, …), in batches."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i:i + self.batch_size]

    def indices_of(self, batch: int) -> list[int]:
        return self.indices[batch * self.batch_size:(batch + 1) * self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def carve_validation(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split ``train`` into (train, val) with a permutation seeded by ``seed``. The validation part
    reads from ``train.evaluation_view()`` when the dataset has one (no train-time augmentation)."""
    n = len(train)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise ValueError(f"cannot carve a validation split of {n_val} from {n} training samples")
    g = torch.Generator().manual_seed(int(seed) + 104729)
    perm = torch.randperm(n, generator=g).tolist()
    view = getattr(train, "evaluation_view", None)
    return Subset(train, sorted(perm[n_val:])), Subset(view() if view else train, sorted(perm[:n_val]))


def collate_of(*datasets: Any) -> Any:
    """The first ``collate_fn`` any of the datasets (or the datasets they wrap) exposes."""
    for d in datasets:
        while d is not None:
            fn = getattr(d, "collate_fn", None)
            if fn is not None:
                return fn
            d = getattr(d, "dataset", None)
    return None


class EpochSeededWorkers:
    """``worker_init_fn`` seeding each worker's torch/numpy/python RNGs from (seed, the sampler's
    epoch, worker id), so random augmentation in workers repeats exactly when a run resumes at an
    epoch boundary (mid-epoch resumption with workers re-seeds them as at the epoch's start)."""

    def __init__(self, seed: int, sampler: Any) -> None:
        self.seed, self.sampler = int(seed), sampler

    def __call__(self, worker_id: int) -> None:
        epoch = int(getattr(self.sampler, "epoch", 0))
        value = (self.seed * 1_000_003 + epoch * 10_007 + worker_id) % 2**32
        torch.manual_seed(value)
        np.random.seed(value)
        random.seed(value)


def make_loader(dataset: Dataset, batch_sampler: Sampler, num_workers: int = 0, collate_fn: Any = None,
                pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader with its own generator, so creating an iterator never draws from the global
    torch RNG (which would shift dropout masks between a resumed and an uninterrupted run), and
    workers seeded per epoch (:class:`EpochSeededWorkers`)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(int(seed)),
                      worker_init_fn=EpochSeededWorkers(seed, batch_sampler) if num_workers else None,
                      persistent_workers=False)


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


# -- non-finite inputs ----------------------------------------------------------------------------
class NonFiniteInputError(FloatingPointError):
    """A batch of data holds NaN or infinite values (the data is at fault, not the training)."""


def source_index(dataset: Any, index: int) -> int:
    """``index`` in ``dataset`` mapped through any ``Subset`` wrappers to the index in the data it wraps."""
    while isinstance(dataset, Subset):
        index, dataset = int(dataset.indices[index]), dataset.dataset
    return index


def find_nonfinite(inputs: Any) -> tuple[str, int, float] | None:
    """(modality, batch row, first bad value) of the first non-finite input value, or None."""
    if not isinstance(inputs, dict):
        return None
    for m, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0:
            bad = ~torch.isfinite(x.detach().reshape(x.shape[0], -1))
            rows = bad.any(1).nonzero()
            if len(rows):
                row = int(rows[0])
                return m, row, float(x.detach().reshape(x.shape[0], -1)[row][bad[row]][0])
    return None


def nonfinite_input_error(inputs: Any, split: str, indices: list[int] | None = None, dataset: Any = None,
                          where: str = "") -> NonFiniteInputError | None:
    """The error naming the modality and sample whose input is not finite (None when all are finite).

    ``indices`` are the batch's sample indices in ``dataset`` (the loader's), mapped to the index in
    the split's own data; ``where`` adds context such as the epoch and step."""
    found = find_nonfinite(inputs)
    if found is None:
        return None
    modality, row, value = found
    sample = f"row {row} of the batch"
    if indices is not None and row < len(indices):
        sample = f"sample {source_index(dataset, indices[row]) if dataset is not None else indices[row]}"
    return NonFiniteInputError(f"the {split} data holds a non-finite value ({value}) in modality {modality!r}, "
                               f"{sample}{where}; the data is at fault, not the training settings: fix or clean "
                               f"the dataset")


def loader_batch_indices(loader: Any, batch: int) -> list[int] | None:
    """The sample indices of batch number ``batch`` of a loader whose sampler can tell them."""
    sampler = getattr(loader, "batch_sampler", None)
    return sampler.indices_of(batch) if hasattr(sampler, "indices_of") else None


class FiniteInputs:
    """Iterates a loader, raising :class:`NonFiniteInputError` at the first batch whose inputs are
    not finite (evaluation data: a NaN there would otherwise give NaN metrics)."""

    def __init__(self, loader: DataLoader, split: str) -> None:
        self.loader, self.split = loader, split

    def __iter__(self) -> Iterator[Any]:
        for number, (inputs, targets) in enumerate(self.loader):
            error = nonfinite_input_error(inputs, self.split, loader_batch_indices(self.loader, number),
                                          self.loader.dataset)
            if error is not None:
                raise error
            yield inputs, targets

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, batch_sampler, … of the loader it wraps
        return getattr(self.__dict__["loader"], name)
