"""Worker processes are seeded per epoch, so random augmentation repeats after an epoch-boundary resume."""
import torch
from torch.utils.data import Dataset

from modbal.train.data import ShardedBatchSampler, make_loader


class RandomAugment(Dataset):
    """Each item draws from the torch RNG, as a random crop or flip would."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(1) + index


def epoch_values(loader, epoch):
    loader.batch_sampler.set_epoch(epoch)
    return torch.cat([batch.flatten() for batch in loader])


def test_workers_draw_the_same_augmentation_in_a_resumed_epoch():
    def fresh():
        return make_loader(RandomAugment(), ShardedBatchSampler(8, 4, seed=1), num_workers=2, seed=1)

    uninterrupted = fresh()
    first = epoch_values(uninterrupted, 0)
    second = epoch_values(uninterrupted, 1)
    resumed = fresh()  # a new process resuming at epoch 1
    assert torch.equal(epoch_values(resumed, 1), second)
    assert not torch.equal(first.sort().values, second.sort().values)  # epochs still differ
