import os
import stat
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and CI has only two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def disk_writes(monkeypatch):
    """What reaches the disk, in order: ("sync file", its size), ("rename", the new name), ("sync folder", its
    inode number)."""
    events = []
    fsync, replace = os.fsync, os.replace

    def spied_fsync(descriptor):
        status = os.fstat(descriptor)
        folder = stat.S_ISDIR(status.st_mode)
        events.append(("sync folder", status.st_ino) if folder else ("sync file", status.st_size))
        fsync(descriptor)

    def spied_replace(source, target):
        events.append(("rename", Path(target).name))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", spied_fsync)
    monkeypatch.setattr(os, "replace", spied_replace)
    return events


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two GPUs, as torch.cuda tells of them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Stand-in GPU {index}")
    return "there are 2: cuda:0 (Stand-in GPU 0), cuda:1 (Stand-in GPU 1)"


def pretend_accelerator(monkeypatch, backend, count: int) -> None:
    """A machine without CUDA whose accelerator is `backend` (torch.xpu, torch.mps), with `count` devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(backend, "is_available", lambda: True)
    monkeypatch.setattr(backend, "device_count", lambda: count)


@pytest.fixture
def two_xpus(monkeypatch):
    """A machine with two Intel XPUs, as torch.xpu tells of them."""
    pretend_accelerator(monkeypatch, torch.xpu, 2)
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda index=None: f"Stand-in XPU {index}")
    return "there are 2: xpu:0 (Stand-in XPU 0), xpu:1 (Stand-in XPU 1)"


@pytest.fixture
def an_mps(monkeypatch):
    """A Mac: one MPS device (torch.mps counts one at most)."""
    pretend_accelerator(monkeypatch, torch.mps, 1)
    return "there is one: mps:0"
