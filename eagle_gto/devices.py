"""The check of a CUDA device a command or a device map names, before anything is loaded onto it (torch fails
later, part-way through loading, in its own words). Needs nothing but torch: the benchmarks that run under an
older transformers use it too."""

from __future__ import annotations

import re

import torch

NEGATIVE_GPU = re.compile(r"cuda:(-\d+)")  # a GPU index torch.device refuses, in words that name no GPU


def cuda_device_problem(device) -> str | None:
    """What keeps `device` (a name torch takes, such as "cuda:1", a torch.device, or a GPU index as a device map
    gives one) from being used here: no CUDA, or no GPU of that index. None where it can be used, and for
    anything not a CUDA device (cpu; "auto" and the other names accelerate takes; a plain index on a machine
    whose accelerator is another, an XPU or MPS, which the index names there)."""
    if isinstance(device, int) and not isinstance(device, bool):
        if not torch.cuda.is_available() and torch.accelerator.is_available():  # (torch.device(0) is its device)
            return None
        index = device
    elif isinstance(device, str) and (negative := NEGATIVE_GPU.fullmatch(device)):
        index = int(negative[1])
    else:
        try:
            place = torch.device(device)
        except (RuntimeError, TypeError):  # not a device name: not this check's to refuse
            return None
        if place.type != "cuda":
            return None
        index = place.index
    if not torch.cuda.is_available():
        return f"CUDA is not available here (torch {torch.__version__}); use cpu"
    count = torch.cuda.device_count()
    if index is not None and not 0 <= index < count:
        gpus = [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(count)]
        there_are = f"there is one: {gpus[0]}" if count == 1 else f"there are {count}: " + ", ".join(gpus)
        return f"there is no GPU {index} here; {there_are}"
    return None
