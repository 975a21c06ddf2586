"""Errors during training said once under several processes (torchrun / accelerate launch), for both trainers.

The checks before training compare their outcomes over the processes (checks_said_once). An error during
training cannot be compared so: the other processes may be waiting for this one in a collective. Instead:

- an error every process meets alike (`seen_by_all`, e.g. a diverged step: its gradient norm is reduced) is
  said by rank 0; the others leave quietly with status 0 (rank 0 fails the launch; had they failed, the
  launcher could stop rank 0 before it says why);
- any other (a write that fails on one node) is said by the first process that meets it, which leaves with
  status 1: the launcher then stops the others. Each process that fails notes it in the processes' shared
  store, so that another one failing at the same time, or finding the connection to it closed in a collective,
  leaves quietly with status 0 instead of saying it again or printing a traceback.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch

from .processes import process_state

FAILED = "eagle_gto/failed"  # the store's count of processes that stopped on an error they say (or left to another)


def main_process() -> bool:
    """Rank 0 (or no launcher): what is said or written once, it does. Read from RANK, which torchrun and
    `accelerate launch` set: nothing is imported (a Ctrl-C may have cut accelerate's import short)."""
    return not int(os.environ.get("RANK", "0"))


@contextmanager
def errors_said_once(prog: str):
    """Bad options, paths or data met during training: `prog: message` in one line, said by one process, and
    a non-zero exit status for the run (in one process: `one_line_errors`)."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise SystemExit(_message_or_quiet(f"{prog}: {err}", getattr(err, "seen_by_all", False))) from None
    except Exception:
        if _another_failed():  # (a collective that lost the process that stopped: that one says why)
            raise SystemExit(0) from None
        raise


def _store():
    """The store of the processes' group (torch.distributed's key-value store), None in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.distributed_c10d._get_default_store()  # (no public accessor; it is the group's own)


def _message_or_quiet(message: str, seen_by_all: bool) -> str | int:
    """`message` where this process says it, else 0: leave quietly."""
    store = _store()
    if store is None:
        return message
    try:
        first = store.add(FAILED, 1) == 1
    except RuntimeError:  # the store is gone with the process that held it (rank 0): say it here
        return message
    speaks = torch.distributed.get_rank() == 0 if seen_by_all else first
    return message if speaks else 0


def _another_failed() -> bool:
    store = _store()
    try:
        return store is not None and store.check([FAILED])
    except RuntimeError:  # the store is gone with the process that held it: nothing tells
        return False


@contextmanager
def one_line_errors(prog: str):
    """Bad options, paths or data: `prog: message` and exit status 1 instead of a traceback."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise SystemExit(f"{prog}: {err}") from None


@contextmanager
def checks_said_once(prog: str):
    """`one_line_errors` for the checks every process makes alike before training (nothing inside may wait for
    the other processes). Under several processes they then compare: rank 0 says the failure (that of the lowest
    rank with one) and every process stops, none left waiting for one that stopped; the others say nothing and
    leave with status 0 (a failed one would make the launcher stop rank 0 before it says why)."""
    state = process_state()
    failure = None
    try:
        yield
    except (OSError, ValueError) as err:
        failure = f"{prog}: {err}"
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        failure = next((f for f in gather_object([failure]) if f), None)
    if failure:
        raise SystemExit(failure if state.is_main_process else 0)


class TrainingDiverged(ValueError):
    """A step's gradients hold NaN or infinity."""

    seen_by_all = True  # (the norm of the reduced gradients: every process stops at the same step)


def check_gradient_norm(norm: torch.Tensor | float, step: int) -> None:
    """Stop before a step with NaN or infinite gradients updates the head: the
    run would go on for hours and export weights whose drafts are never
    accepted. (Under DDP the norm is taken of the reduced gradients, so every
    process stops at the same step.)"""
    value = float(norm)
    if not math.isfinite(value):
        raise TrainingDiverged(f"step {step}: the gradient norm is {value}: training diverged (or a batch's loss is "
                               "not a number); the head was not updated with it. Lower --lr and start again")
