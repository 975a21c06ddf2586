"""The check of a CUDA, XPU or MPS device a command or a device map names, before anything is loaded onto it
(torch fails later, part-way through loading, in its own words). Needs nothing but torch: the benchmarks that run
under an older transformers use it too."""

from __future__ import annotations

import re

import torch

NEGATIVE_GPU = re.compile(r"cuda:(-\d+)")  # a GPU index torch.device refuses, in words that name no GPU
# The accelerators checked, each with its name and what one of its devices is called (torch.<type> tells of them;
# torch.mps counts one device at most).
ACCELERATORS = {"cuda": ("CUDA", "GPU"), "xpu": ("XPU", "XPU"), "mps": ("MPS", "MPS device")}


def accelerator_place(device) -> tuple[str, int | None] | None:
    """(type, index) of the CUDA, XPU or MPS device `device` names (a name torch takes, such as "cuda:1" or "xpu:1",
    a torch.device, or a GPU index as a device map gives one); None for anything else (cpu; "auto" and the other
    names accelerate takes; a plain index on a machine whose accelerator is another, an XPU or MPS, which the
    index names there)."""
    if isinstance(device, int) and not isinstance(device, bool):
        if not torch.cuda.is_available() and torch.accelerator.is_available():  # (torch.device(0) is its device)
            return None
        return "cuda", device
    if isinstance(device, str) and (negative := NEGATIVE_GPU.fullmatch(device)):
        return "cuda", int(negative[1])
    try:
        place = torch.device(device)
    except (RuntimeError, TypeError):  # not a device name: not this check's to refuse
        return None
    return (place.type, place.index) if place.type in ACCELERATORS else None


def device_problem(device) -> str | None:
    """What keeps `device` (as `accelerator_place` takes it) from being used here: no such accelerator, or no
    device of that index. None where it can be used, and for anything not a CUDA, XPU or MPS device."""
    place = accelerator_place(device)
    if place is None:
        return None
    kind, index = place
    name, one = ACCELERATORS[kind]
    backend = getattr(torch, kind, None)
    if not (hasattr(backend, "is_available") and hasattr(backend, "device_count")):  # (an older torch's mps, xpu)
        return None
    if not backend.is_available():
        return f"{name} is not available here (torch {torch.__version__}); use cpu"
    count = backend.device_count()
    if index is not None and not 0 <= index < count:
        named = getattr(backend, "get_device_name", None)  # (torch.mps has none)
        devices = [f"{kind}:{i}" + (f" ({named(i)})" if named else "") for i in range(count)]
        there_are = f"there is one: {devices[0]}" if count == 1 else f"there are {count}: " + ", ".join(devices)
        return f"there is no {one} {index} here; {there_are}"
    return None
