"""Samplers of the training scripts.

* `RASampler`: repeated augmentation (DeiT) for Adventurer's distributed training (SPEC 6.2).
* `EpochSeededRandomSampler`: single-process shuffling that depends only on (seed, epoch).
* `ResumableSampler` + `SeededSamples`: the training stream of all three scripts. Every sample carries its
  own augmentation seed drawn from (seed, epoch, rank, position in the epoch), and an epoch can start at
  any position. So augmentations depend neither on the process history nor on the number of DataLoader
  workers, and a run resumed mid-epoch (checkpoint `sampler` entry) sees the very same samples and
  augmentations as an uninterrupted one.

timm's RepeatAugSampler yields exactly the official index stream for data sets of 256 samples or more
(ECOSYSTEM: identical over N, world size and epoch). Official per epoch: randperm(N, seed=epoch), every
index repeated 3 times in a row, wrap-around padding to a multiple of the world size, rank r takes every
world-th element from r, truncated to floor((N // 256) * 256 / world) samples.

Small data sets: the official truncation gives 0 samples when N < 256, which makes demo runs on a few
hundred images silently train on nothing. For N < 256 this sampler keeps timm's rule instead: each rank
yields ceil(N / world) samples of the same repeated stream, i.e. one epoch has as many samples as the
data set (never fewer than one round of N).
"""
import hashlib
import random

import numpy as np
import torch
import torch.distributed as dist
from timm.data.distributed_sampler import RepeatAugSampler


class RASampler(RepeatAugSampler):
    """Each sample is drawn `num_repeats` times per epoch, the copies landing on different ranks.

    `num_replicas` / `rank` default to the initialised process group, else to a single process (timm
    would raise when torch.distributed is not initialised). Call `set_epoch(epoch)` before every epoch:
    the permutation is seeded by the epoch, identically on all ranks.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, num_repeats=3):
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"RASampler: rank {rank} is outside [0, {num_replicas - 1}]")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         num_repeats=num_repeats, selected_round=256)


class EpochSeededRandomSampler(torch.utils.data.RandomSampler):
    """RandomSampler whose order depends only on (seed, epoch), so a resumed epoch sees the same order."""

    def __init__(self, dataset, seed=0):
        super().__init__(dataset, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):  # every pass over an epoch gives its order, however often it is iterated
        self.generator.manual_seed(self.seed * 100_003 + self.epoch)
        return super().__iter__()


def stream_seed(*parts):
    """A 63-bit seed from integers, evenly spread (nearby inputs give unrelated seeds)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a sampler: yields `(index, seed)` pairs and can start an epoch at a given position.

    `set_epoch(e)` forwards to the wrapped sampler and starts the epoch at 0; `start_at(n)` then skips the
    first n samples of it (the part a checkpoint has already trained).
    """

    def __init__(self, sampler, seed=0, rank=0):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch, self.start = epoch, 0
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def start_at(self, position):
        self.start = position

    def loader_generator(self):
        """A generator for the DataLoader: its worker seeds follow (seed, epoch, rank), not the global RNG."""
        return torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, self.rank, "workers"))

    def __len__(self):
        return max(len(self.sampler) - self.start, 0)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield index, stream_seed(self.seed, self.epoch, self.rank, position)


class SeededSamples(torch.utils.data.Dataset):
    """A data set read with `(index, seed)` keys: each sample's transforms run on generators seeded by `seed`.

    Python's, numpy's and torch's CPU generators are put back afterwards, so loading in the main process
    (num_workers 0) leaves the training's random streams (mixup, drop path) untouched.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # bad_image_count, classes, ... of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        index, seed = key
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # CPU only: a CUDA generator in use stays as it is
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
