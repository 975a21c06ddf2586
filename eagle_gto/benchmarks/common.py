"""What the benchmarks share: timing, their timing options and checks, and result files. Of the engine it
imports only the checks of tree.py and devices.py and dtype_option's --dtype, which need nothing but torch (see
shapes.py: the reference-engine benchmark runs under an older transformers)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ..devices import device_problem
from ..dtype_option import add_dtype_option
from ..tree import check_tree_params


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


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark that times generation on a random model (engine_overhead, reference_engine)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when there is one)")
    add_dtype_option(p)
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--total-tokens", default="10,30,60,100", help="comma-separated tree sizes")
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-length", type=int, default=2048, help="KV cache capacity, as in eagenerate")
    p.add_argument("--seed", type=int, default=0)


def check_device(p: argparse.ArgumentParser, device: str) -> None:
    """Refuse (argparse's error) a --device torch does not know, a CUDA one where there is none, or a GPU this
    machine lacks."""
    try:
        torch.device(device)
    except RuntimeError:
        p.error(f"--device {device}: not a device torch knows (cuda, cuda:1 or cpu)")
    problem = device_problem(device)
    if problem:
        p.error(f"--device {device}: {problem}")


def check_timing_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, draft_vocab_size: int | None = None,
                           stop_margin: int = 0) -> None:
    """Refuse (argparse's error), before a model is built, the `add_timing_arguments` values that would fail part-way
    or time the wrong thing; --total-tokens becomes a list of ints. `stop_margin`: positions short of --max-length
    at which the engine stops (beyond the tree's)."""
    if args.new_tokens < 2 or args.repeats < 1 or args.prompt_length < 1:
        p.error("need --new-tokens >= 2, --repeats >= 1 and --prompt-length >= 1")
    if not -2**63 <= args.seed < 2**64:
        p.error(f"--seed {args.seed} is out of range: torch's seeds are integers from {-2**63} to {2**64 - 1}")
    check_device(p, args.device)
    typed = args.total_tokens
    try:
        args.total_tokens = [int(t) for t in typed.split(",")]
    except ValueError:
        p.error(f"--total-tokens {typed}: give tree sizes as comma-separated integers, e.g. 10,30,60")
    try:
        for size in args.total_tokens:
            check_tree_params(size, args.depth, args.top_k, draft_vocab_size)
    except ValueError as err:  # (all three named: the fault may be --depth's or --top-k's)
        p.error(f"--total-tokens {typed}, --depth {args.depth}, --top-k {args.top_k}: {err}")
    # Every timed step must be a full iteration: near the end of the context this project's engine goes on
    # one token at a time and the reference stops, which would be averaged in.
    if args.prompt_length + args.new_tokens + max(args.total_tokens) + stop_margin > args.max_length:
        margin = f" + {stop_margin} (the engine stops that far short of it)" if stop_margin else ""
        p.error(f"--prompt-length {args.prompt_length} + --new-tokens {args.new_tokens} + the largest tree "
                f"{max(args.total_tokens)}{margin} must fit in --max-length {args.max_length}")


def write_json(path: str | None, result: dict | list) -> None:
    """Write the results to `path` (folders made as needed); nothing without a path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
