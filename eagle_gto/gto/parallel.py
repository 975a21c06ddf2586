"""Data-parallel GTO over the processes torchrun or `accelerate launch` started.

Every process draws the same global batch of windows and the same groups
(the same seeded generators draw what one process draws), computes the
losses of its own contiguous share of the windows with every mean taken over
the whole batch, and the gradients are summed over the processes: the update
is the one-process update on the whole global batch. One process is the
plain case (`Share()`): nothing is exchanged and nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .trees import Roots


def launched_processes() -> int:
    """WORLD_SIZE: how many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_device() -> torch.device | None:
    """Under several processes: this process's own device (the GPU LOCAL_RANK, or the CPU); None in one process."""
    if launched_processes() == 1:
        return None
    from ..train.processes import process_state

    return process_state().device


@dataclass(frozen=True)
class Share:
    """This process's part of each global batch: windows rank*n .. rank*n + n of n*world."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where the reductions run (gloo: cpu; nccl: this process's GPU)

    @classmethod
    def launched(cls) -> Share:
        """The processes of this launch; starts torch.distributed under several (accelerate's PartialState)."""
        if launched_processes() == 1:
            return cls()
        from ..train.processes import process_state

        state = process_state()
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def windows(self, total: int) -> slice:
        """This process's rows of a global batch of `total` windows."""
        per = total // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def roots(self, roots: Roots, mine: slice) -> Roots:
        """The roots (drawn over the global batch) in this process's windows `mine`, numbered within them."""
        keep = (roots.seq >= mine.start) & (roots.seq < mine.stop)
        return Roots(roots.seq[keep] - mine.start, roots.pos[keep])

    def sum(self, values: list[float]) -> list[float]:
        """The sums over the processes (float64, so that counts and sums stay exact)."""
        if self.world == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def mean(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        """The means over all processes of `stats`, each a mean over `weight` items of this process
        (in one process: `stats` as they are, bit for bit)."""
        if self.world == 1:
            return stats
        *sums, count = self.sum([value * weight for value in stats.values()] + [weight])
        return {key: value / max(count, 1) for key, value in zip(stats, sums)}

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Each process's loss is its share of the global loss: the summed gradients are the global gradient."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads]).to(self.device)
        torch.distributed.all_reduce(flat)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).to(p.device)

    def from_main(self, value):
        """The main process's `value` (any picklable object), on every process."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def wait(self) -> None:
        """Until every process gets here."""
        if self.world > 1:
            torch.distributed.barrier()
