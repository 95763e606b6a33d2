"""Samplers of the training scripts.

* `RASampler`: repeated augmentation (DeiT) for Adventurer's distributed training (SPEC 6.2).
* `EpochSeededRandomSampler`: single-process shuffling that depends only on (seed, epoch).
* `SkipFirst`: the rest of a partly trained epoch, for mid-epoch resumes.

timm's RepeatAugSampler yields exactly the official index stream for data sets of 256 samples or more
(ECOSYSTEM: identical over N, world size and epoch). Official per epoch: randperm(N, seed=epoch), every
index repeated 3 times in a row, wrap-around padding to a multiple of the world size, rank r takes every
world-th element from r, truncated to floor((N // 256) * 256 / world) samples.

Small data sets: the official truncation gives 0 samples when N < 256, which makes demo runs on a few
hundred images silently train on nothing. For N < 256 this sampler keeps timm's rule instead: each rank
yields ceil(N / world) samples of the same repeated stream, i.e. one epoch has as many samples as the
data set (never fewer than one round of N).
"""
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
        self.generator.manual_seed(self.seed * 100_003 + epoch)


class SkipFirst(torch.utils.data.Sampler):
    """The sampler's stream without its first `count` indices (the part of an epoch already trained)."""

    def __init__(self, sampler, count):
        self.sampler, self.count = sampler, count

    def __len__(self):
        return max(len(self.sampler) - self.count, 0)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.count:
                yield index
