"""``dataset.sampler=balanced``: each training batch drawn with every class equally likely.

Class weights (``class_weights=balanced``) scale each image's loss; this sampler instead changes what the model
sees: an epoch of as many draws as there are training images, with replacement, each image drawn with probability
1 / (its class's count x the number of classes). Rare-class images repeat within an epoch (augmentation makes the
repeats differ) and common ones are skipped. torch's ``WeightedRandomSampler`` does the drawing's arithmetic; this
class adds what training here needs of an order: seeded by the epoch (``set_epoch``), so a resumed epoch draws the
same images again, and under torchrun every process draws the same sequence and keeps its share, as
``DistributedSampler`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from cellcls.errors import ConfigError


class BalancedSampler(Sampler[int]):
    """Indices of ``labels`` for one epoch, classes equally likely; ``shard=(world_size, rank)`` keeps this process's
    share of the draws."""

    def __init__(self, labels: Sequence[int], classes: Sequence[str], seed: int,
                 shard: tuple[int, int] | None = None) -> None:
        counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=len(classes))
        empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
        if empty:
            raise ConfigError(f"dataset.sampler=balanced: the training split has no images of {', '.join(empty)}; a "
                              "class with no images cannot be drawn (add its images or remove it from dataset.classes)")
        self.weights = (1.0 / counts.double())[torch.as_tensor(list(labels), dtype=torch.long)]
        self.seed, self.epoch = int(seed), 0
        self.world, self.rank = shard if shard is not None else (1, 0)
        self.total = -(-len(self.weights) // self.world) * self.world  # padded so every process gets as many

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.total // self.world

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        return iter(draws[self.rank :: self.world].tolist())
