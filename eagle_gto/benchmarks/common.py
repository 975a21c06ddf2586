"""What the benchmarks share: timing and result files (no engine imports, see shapes.py)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_of(fn, repeats: int) -> float:
    """Median of `repeats` results of fn() after one unrecorded warm-up call."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes per second moved (read + write) by a large device-to-device copy."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        synchronize(device)
        return 2 * nbytes * 5 / (time.perf_counter() - start)

    return median_of(run, repeats)


def write_json(path: str | None, result: dict) -> None:
    """Write the results to `path` (folders made as needed); nothing without a path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
