"""What each optimizer step trains with: the learning rate (warm-up, then cosine) and each process's
micro-batches of sample indices, epoch after epoch."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    warmup = max(1, round(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class MicroBatches:
    """Micro-batches of sample indices for one process, epoch after epoch,
    each epoch in its own seeded order; (epoch, index) is all a resume needs
    (index in micro-batches over all processes: resumed_index converts it to another split).
    An epoch is a whole number of global batches (x `grad_accum`): every split
    of one global batch ends its epochs at the same sample."""

    def __init__(self, count: int, batch_size: int, world: int, rank: int, seed: int, epoch: int = 0, index: int = 0,
                 grad_accum: int = 1):
        self.count, self.batch_size, self.world, self.rank, self.seed = count, batch_size, world, rank, seed
        self.epoch, self.index = epoch, index
        self.per_epoch = max(1, count // (batch_size * world * grad_accum)) * grad_accum

    def next(self) -> list[int]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        size = self.batch_size * self.world
        order = order.repeat(math.ceil(self.per_epoch * size / self.count))  # a data set smaller than one epoch
        start = self.index * size + self.rank * self.batch_size
        self.index += 1
        return order[start : start + self.batch_size].tolist()
