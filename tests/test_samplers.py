"""RASampler: the official DeiT/Adventurer index stream for N >= 256, a full round for smaller sets."""
import math

import pytest
import torch

from samplers import RASampler


def official_stream(n, world, rank, epoch, shuffle=True, truncate=True):
    """The official rule written out (SPEC 6.2): repeat x3, pad by wrap-around, stride by world, truncate."""
    g = torch.Generator()
    g.manual_seed(epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    repeated = [i for i in order for _ in range(3)]
    total = math.ceil(n * 3 / world) * world
    repeated += repeated[: total - len(repeated)]
    mine = repeated[rank:total:world]
    return mine[: math.floor(n // 256 * 256 / world)] if truncate else mine


@pytest.mark.parametrize("n", [256, 1000])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("epoch", [0, 3])
def test_matches_official_stream(n, world, epoch):
    for rank in range(world):
        sampler = RASampler(range(n), num_replicas=world, rank=rank)
        sampler.set_epoch(epoch)
        expected = official_stream(n, world, rank, epoch)
        assert list(sampler) == expected
        assert len(sampler) == len(expected)


def test_unshuffled_matches_official_stream():
    sampler = RASampler(range(300), num_replicas=2, rank=1, shuffle=False)
    assert list(sampler) == official_stream(300, 2, 1, 0, shuffle=False)


def test_imagenet_length_per_rank():
    """SPEC 6.2: ImageNet-1k on 8 GPUs gives 160,128 samples per rank."""
    assert len(RASampler(range(1_281_167), num_replicas=8, rank=3)) == 160_128


@pytest.mark.parametrize("n,world", [(100, 1), (100, 2), (7, 3)])
def test_small_dataset_yields_one_round(n, world):
    """Official would yield 0 samples below 256; we yield ceil(N/world) of the same repeated stream."""
    assert official_stream(n, world, 0, 0) == []
    streams = []
    for rank in range(world):
        sampler = RASampler(range(n), num_replicas=world, rank=rank)
        sampler.set_epoch(2)
        stream = list(sampler)
        assert len(stream) == len(sampler) == math.ceil(n / world)
        assert stream == official_stream(n, world, rank, 2, truncate=False)[: math.ceil(n / world)]
        streams.append(stream)
    if world > 1:  # the repeats of the first index go to different ranks
        assert streams[0][0] == streams[1][0]


def test_set_epoch_reshuffles_and_is_deterministic():
    a, b = RASampler(range(512), num_replicas=1, rank=0), RASampler(range(512), num_replicas=1, rank=0)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_defaults_to_single_process_without_process_group():
    sampler = RASampler(range(512))
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert len(sampler) == 512


def test_rejects_rank_outside_world():
    with pytest.raises(ValueError, match="rank 2"):
        RASampler(range(512), num_replicas=2, rank=2)


def test_resumable_sampler_starts_an_epoch_anywhere_with_the_same_sample_seeds():
    from samplers import EpochSeededRandomSampler, ResumableSampler

    sampler = ResumableSampler(EpochSeededRandomSampler(range(20), seed=3), seed=3, rank=0)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.start_at(8)
    assert len(sampler) == 12 and list(sampler) == whole[8:]
    sampler.set_epoch(3)  # a new epoch starts at 0 again, with other seeds
    assert len(sampler) == 20 and [s for _, s in sampler] != [s for _, s in whole]
    other_rank = ResumableSampler(EpochSeededRandomSampler(range(20), seed=3), seed=3, rank=1)
    other_rank.set_epoch(2)
    assert [i for i, _ in other_rank] == [i for i, _ in whole] and list(other_rank) != whole


def test_seeded_samples_repeat_per_seed_and_leave_the_callers_random_streams_alone():
    import random

    import numpy as np

    from samplers import SeededSamples

    class Noisy(torch.utils.data.Dataset):
        bad_image_count = 7

        def __len__(self):
            return 4

        def __getitem__(self, index):
            return index, random.random(), float(np.random.rand()), float(torch.rand(()))

    data = SeededSamples(Noisy())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    first, other, again = data[(1, 11)], data[(1, 12)], data[(1, 11)]
    assert first == again and first[1:] != other[1:]
    # the caller's streams continue as if no sample had been read
    assert random.random() == random.Random(0).random()
    assert np.random.rand() == np.random.RandomState(0).rand()
    assert torch.equal(torch.rand(()), torch.rand((), generator=torch.Generator().manual_seed(0)))
    assert data.bad_image_count == 7 and len(data) == 4  # attributes of the wrapped data set show through
