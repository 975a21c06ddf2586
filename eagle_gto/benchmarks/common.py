"""What the benchmarks share: timing and result files (no engine imports, see shapes.py)."""

from __future__ import annotations

import argparse
import json
import os
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


def bandwidth_floors(base, bandwidth: float) -> dict:
    """The bandwidth floor of one decode step, in ms, two ways:
    - `floor_ms`: every weight byte read once (perf-anchor.md's definition,
      which issue 7's targets are stated against);
    - `read_floor_ms`: the bytes a step does read: the input embedding table
      contributes one row, not all of it (unless the output layer shares it).
    For Llama-3.1-8B the table is 1.05 of 16.06 GB: the second floor is ~6.5% lower."""
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    table = base.get_input_embeddings().weight
    output = base.get_output_embeddings()
    shared = output is not None and output.weight is table  # tied: the output layer reads the whole table
    table_bytes, row_bytes = table.numel() * table.element_size(), table[0].numel() * table.element_size()
    read = weights if shared else weights - table_bytes + row_bytes
    return {"weight_bytes": weights, "read_bytes": read, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "floor_ms": 1000 * weights / bandwidth, "read_floor_ms": 1000 * read / bandwidth}


def check_output_file(p: argparse.ArgumentParser, option: str, path: str | None) -> None:
    """Refuse (argparse's error), before anything is measured, a result file that could not be written at the
    end of the run: a folder, a path under a file, no write permission. Nothing is created here (write_json
    makes the missing folders)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        p.error(f"{option} {path}: a folder, not a file")
    nearest = next(folder for folder in path.absolute().parents if folder.exists())
    if not nearest.is_dir():
        p.error(f"{option} {path}: {nearest} is a file, not a folder")
    if not os.access(path if path.exists() else nearest, os.W_OK):
        p.error(f"{option} {path}: not writable")


def write_json(path: str | None, result: dict | list) -> None:
    """Write the results to `path` (folders made as needed); nothing without a path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
