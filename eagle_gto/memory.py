"""Device memory: what a device has in all and free now, and what to tell a
user whose generation ran out of it."""

from __future__ import annotations

import os

import torch


def device_memory(device: torch.device) -> int | None:
    """All the memory of a CPU or CUDA device in bytes; None where it is not known."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # (no sysconf on Windows)
        pass
    return None


def free_memory(device: torch.device) -> int | None:
    """Bytes a new tensor may still take on a CUDA device: what the driver has free and what torch's caching
    allocator holds unused (mem_get_info counts that as used); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def no_room_message(max_length: int, cache_bytes: dict[torch.device, int], allocator_words: str) -> str:
    """What to tell a user whose generation ran out of memory: what the caches of max_length need and what
    is free, where known."""
    needs = []
    for device, needed in cache_bytes.items():
        free = free_memory(device)
        room = "" if free is None else f" ({free / 2**30:.2f} GiB free now)"
        needs.append(f"{needed / 2**30:.2f} GiB on {device}{room}")
    cache = f" (its key/value cache needs {', '.join(needs)})" if needs else ""
    words = allocator_words.partition("\n")[0]  # (the allocator's advice on its settings follows)
    return (f"out of memory generating with max_length={max_length}{cache}: lower max_length, or free memory "
            f"(other processes, other tensors) and try again; the model is still usable. {words}")
