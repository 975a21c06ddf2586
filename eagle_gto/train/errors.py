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

import os
from contextlib import contextmanager

import torch

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
