"""What one decoding step and one draft-and-verify iteration cost.

    python -m eagle_gto.benchmarks.engine_overhead [--shape {tiny,small,llama3-8b}] [--device cuda|cpu] [--json OUT]

Builds a Llama-shaped base model with random weights directly on the device,
and a random EAGLE-3 head of the matching shape, then measures in one run
(one warm-up, median of `--repeats`):

- the bandwidth floor of a decode step: all weight bytes / the device's
  copy bandwidth (bytes read + written per second by a large tensor copy),
  and the lower floor of the bytes a step does read (`bandwidth_floors`);
- ms per plain decode step: the engine's `naivegenerate` (its steps after
  the prefill, from `last_stats`) and transformers' own greedy `generate`
  ((time for N tokens - time for 1 token) / (N - 1), no eos);
- ms per draft-and-verify iteration of `eagenerate` at each tree size
  (`last_stats`: time of the steps after the prefill / their count);
- both for each engine in `--engines`: `eager` (steps launched op by op) and
  `graphs` (steps replayed as CUDA graphs, the default on a GPU), and for
  `graphs` the GPU time of one replayed iteration (CUDA events around
  back-to-back replays): what is left once the host is out of the way.
- with `--profile N`, where that GPU time goes: the replayed iteration's
  kernels under torch.profiler, summed by name, and their sequence;
- `--sdpa-backend` restricts torch's fused attention to one kernel family
  (torch picks cuDNN's on an H100; the memory-efficient one measured slower).

Random weights accept almost no draft, so this measures the cost of an
iteration, not the speedup; the speedup a head with acceptance length tau
would give is about tau x t_plain / t_iteration (`--tau`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..cli_help import show_defaults
from ..dtype_option import auto_dtype
from ..ea_model import EaModel
from ..generation import TreeParams
from ..graphs import COMPILE_MODES
from ..placement import attach_head
from ..tiny import head_config, random_head
from .common import (add_timing_arguments, bandwidth_floors, check_output_file, check_timing_arguments, copy_bandwidth,
                     median_of, synchronize, write_json)
from .shapes import DTYPES, SHAPES, Shape, llama_config


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, tree: TreeParams) -> EaModel:
    """Random base and EAGLE-3 head of `shape`, created on the device (an 8B
    model initialised on the CPU first would take minutes)."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        head_cfg = head_config(cfg, "eagle3", draft_vocab_size=shape.draft_vocab_size)
        head_cfg["intermediate_size"] = shape.intermediate_size  # official heads copy the target's MLP width
        head = random_head(head_cfg)
    attach_head(base, head)
    return EaModel(base, head, None, tree.total_token, tree.depth, tree.top_k)


def ms_per_later_step(model: EaModel) -> float:
    """Mean ms of the steps after the prefill in the latest generation."""
    later = model.last_stats.steps[1:]
    return 1000 * sum(s.seconds for s in later) / len(later)


def plain_step_ms(model: EaModel, prompt: torch.Tensor, new_tokens: int, max_length: int) -> float:
    model.naivegenerate(prompt, max_new_tokens=new_tokens, max_length=max_length)
    return ms_per_later_step(model)


def replay_ms(model: EaModel, repeats: int, replays: int = 20) -> float:
    """GPU ms of the most recently recorded step graph, replayed back to back
    (the replays advance the decode state; the next prefill resets it)."""
    graph = model._graphs.latest()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> float:
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays

    return median_of(run, repeats)


def kernel_profile(model: EaModel, replays: int, trace_path: str | None) -> dict:
    """Where the GPU time of the latest step graph goes: torch.profiler over
    `replays` back-to-back replays (`summarise_kernels`)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    graph = model._graphs.latest()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = trace_path or f"{folder}/trace.json"
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    return summarise_kernels(events, replays)


def summarise_kernels(events: list[dict], replays: int) -> dict:
    """From a Chrome trace's events (kernels: category "kernel", start "ts"
    and "dur" in us) of `replays` identical replays: per replay, the kernel
    count, kernel time and span (first start to last end); kernels summed by
    name; and one replay's kernel sequence (its order shows the phases:
    drafting, verifying, accepting)."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"], []).append(e["dur"])
    per_replay = len(kernels) // replays
    span = (kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]) / replays if kernels else 0.0
    return {
        "replays": replays, "kernels_per_replay": per_replay,
        "kernel_us_per_replay": sum(e["dur"] for e in kernels) / replays, "span_us_per_replay": span,
        "by_name": sorted(({"name": n, "calls": len(d) / replays, "us": sum(d) / replays} for n, d in by_name.items()),
                          key=lambda r: -r["us"]),
        "sequence": [[e["name"][:60], round(e["dur"], 2)] for e in kernels[:per_replay]],
    }


def format_profile(prof: dict, top: int = 25) -> str:
    total = prof["kernel_us_per_replay"]
    lines = [f"kernels of one iteration graph: {prof['kernels_per_replay']} kernels, {total:.0f} us of kernel time, "
             f"{prof['span_us_per_replay']:.0f} us from first start to last end (mean of {prof['replays']} replays)",
             "", "| kernel | calls | us | share |", "|---|---|---|---|"]
    for r in prof["by_name"][:top]:
        lines.append(f"| {r['name'][:90]} | {r['calls']:.0f} | {r['us']:.1f} | {r['us'] / max(total, 1e-9):.1%} |")
    return "\n".join(lines)


def hf_generate_ms(base, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """ms per token of transformers' greedy `generate` with its own sdpa
    attention, as its users run it (before the engine compiles anything)."""
    device = prompt.device

    def seconds(n: int):
        def run() -> float:
            synchronize(device)
            start = time.perf_counter()
            base.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)
            synchronize(device)
            return time.perf_counter() - start
        return run

    engine_attention = base.config._attn_implementation
    base.set_attn_implementation("sdpa")
    try:
        return 1000 * (median_of(seconds(new_tokens), repeats) - median_of(seconds(1), repeats)) / (new_tokens - 1)
    finally:
        base.set_attn_implementation(engine_attention)


def measure(model: EaModel, prompt: torch.Tensor, new_tokens: int, total_tokens: list[int], repeats: int,
            max_length: int, engine_names: list[str], profile_replays: int = 0,
            trace_path: str | None = None) -> dict:
    device = prompt.device
    base = model.base_model
    bandwidth = copy_bandwidth(device, repeats)
    engines = {}
    for engine in engine_names:
        model.cuda_graphs = engine == "graphs"
        engines[engine] = {"plain_ms": median_of(lambda: plain_step_ms(model, prompt, new_tokens, max_length),
                                                 repeats), "iterations": {}}
        for size in total_tokens:
            model.tree = replace(model.tree, total_token=size)
            taus = []

            def speculative() -> float:
                model.eagenerate(prompt, max_new_tokens=new_tokens, max_length=max_length)
                taus.append(model.last_stats.mean_accepted_length)
                return ms_per_later_step(model)

            it = {"ms": median_of(speculative, repeats), "tau": statistics.median(taus)}
            if engine == "graphs":
                it["replay_ms"] = replay_ms(model, repeats)
                if profile_replays:
                    it["profile"] = kernel_profile(model, profile_replays, trace_path)
                    print(format_profile(it["profile"]), flush=True)
            engines[engine]["iterations"][size] = it
    return {**bandwidth_floors(base, bandwidth), "engines": engines}


def add_ratios(result: dict, tau: float) -> None:
    floor = result["floor_ms"]
    result["hf_generate_x_floor"] = result["hf_generate_ms"] / floor
    for engine in result["engines"].values():
        plain = engine["plain_ms"]
        engine["plain_x_floor"] = plain / floor
        for it in engine["iterations"].values():
            it["x_plain"] = it["ms"] / plain
            it["x_floor"] = it["ms"] / floor
            it["predicted_speedup"] = tau * plain / it["ms"]
            it["projected_tokens_per_s"] = 1000 * tau / it["ms"]


def format_table(r: dict) -> str:
    """A markdown table (ms and ratios), headed by what was measured where."""
    s, tree = r["shape"], r["tree"]
    floor = r["floor_ms"]

    def row(what: str, ms: float, x_plain: float | None = None, extra: str = "") -> str:
        plain = f"{x_plain:.2f}" if x_plain is not None else ""
        return f"| {what} | {ms:.3f} | {ms / floor:.2f} | {plain} | {extra} |"

    compiled = ""
    if r.get("compiled"):
        compiled = f", compiled ({r['compiled']}, projections {'fused' if r.get('fused') else 'unfused'})"
    if r.get("sdpa_backend", "auto") != "auto":  # (a run of another attention kernel reads like a default one)
        compiled += f", attention {r['sdpa_backend']}"
    lines = [
        f"engine overhead, {r['device_name']}, {r['dtype']}{compiled}, {r['date']}: hidden {s['hidden_size']}, "
        f"{s['num_layers']} layers, heads {s['num_heads']}/{s['num_kv_heads']}, intermediate "
        f"{s['intermediate_size']}, vocab {s['vocab_size']}; prompt {r['prompt_length']}, "
        f"{r['new_tokens']} new tokens, median of {r['repeats']}",
        "",
        f"| what | ms | x floor | x plain (same engine) | tokens/s at tau {r['tau_assumed']} |",
        "|---|---|---|---|---|",
        row(f"bandwidth floor ({r['weight_bytes'] / 1e9:.3f} GB / {r['copy_bandwidth_gb_s']:.1f} GB/s copy)", floor),
        row(f"bytes a step reads (the embedding table: one row; {r['read_bytes'] / 1e9:.3f} GB)", r["read_floor_ms"]),
        row("transformers `generate`, per token", r["hf_generate_ms"]),
    ]
    for name, engine in r["engines"].items():
        lines.append(row(f"{name}: `naivegenerate`, per token", engine["plain_ms"], 1.0))
        for size, it in engine["iterations"].items():
            lines.append(row(f"{name}: `eagenerate` total_token {size}, depth {tree['depth']}, top_k {tree['top_k']}, "
                             "per iteration", it["ms"], it["x_plain"], f"{it['projected_tokens_per_s']:.0f}"))
            if "replay_ms" in it:
                lines.append(row(f"{name}: GPU time of that iteration's graph (replays)", it["replay_ms"]))
    lines.append("")
    for name, engine in r["engines"].items():
        lines.append(f"{name}: predicted speedup at tau {r['tau_assumed']} (tau x plain / iteration): "
                     + ", ".join(f"total_token {size}: {it['predicted_speedup']:.2f}x"
                                 for size, it in engine["iterations"].items()))
    for name, engine in r["engines"].items():  # (each engine's own: a sampled or cut-short run may differ)
        lines.append(f"{name}: measured tau with these random weights: "
                     + ", ".join(f"total_token {size}: {it['tau']:.2f}" for size, it in engine["iterations"].items()))
    return "\n".join(lines)


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                   help="torch.compile the engine first (EaModel.enable_torch_compile), in this mode "
                        "(default: default)")
    p.add_argument("--unfused", action="store_true",
                   help="with --compile: keep the query/key/value and gate/up projections as separate "
                        "matrix products (enable_torch_compile(fuse_projections=False))")


def check_compile_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.unfused and not args.compile:
        p.error("--unfused goes with --compile (the projections are stacked when the engine compiles)")


def compile_engine(model: EaModel, args: argparse.Namespace) -> None:
    if args.compile:
        model.enable_torch_compile(args.compile, fuse_projections=not args.unfused)


def sdpa_backend(name: str):
    """A context restricting scaled_dot_product_attention to one backend;
    tracing (compile) and graph recording happen inside it, so both keep the choice."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([backends[name]])


CUDA_ONLY_SDPA_BACKENDS = ("cudnn", "efficient")
SIZES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")


def check_layers(p: argparse.ArgumentParser, option: str, layers: int) -> None:
    if layers < 3:
        p.error(f"{option} must be at least 3 (an EAGLE-3 head reads three decoder layers), got {layers}")


def pick_shape(p: argparse.ArgumentParser, args: argparse.Namespace) -> Shape:
    """The --shape preset (default: llama3-8b on a GPU, small on a CPU) with the size options' values,
    refused (before a model is built) where the model or its head could not be."""
    preset = SHAPES[args.shape or ("llama3-8b" if args.device.startswith("cuda") else "small")]
    for name in SIZES:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    shape = replace(preset, **{name: getattr(args, name) for name in SIZES if getattr(args, name) is not None})
    if shape.draft_vocab_size is not None and shape.draft_vocab_size >= shape.vocab_size:
        shape = replace(shape, draft_vocab_size=None)  # a smaller --vocab-size: draft over all of it
    check_layers(p, "--num-layers", shape.num_layers)
    hidden, heads, kv_heads = shape.hidden_size, shape.num_heads, shape.num_kv_heads
    if hidden % heads:
        p.error(f"--hidden-size {hidden} must be a multiple of --num-heads {heads}")
    if hidden // heads % 2:  # rotary embeddings turn pairs of dimensions
        p.error(f"--hidden-size {hidden} / --num-heads {heads} = head dim {hidden // heads}: it must be even")
    if heads % kv_heads:
        p.error(f"--num-heads {heads} must be a multiple of --num-kv-heads {kv_heads}")
    draft_vocab = shape.draft_vocab_size or shape.vocab_size
    if args.top_k > draft_vocab:
        p.error(f"--top-k {args.top_k} is larger than the draft vocabulary ({draft_vocab} tokens)")
    return shape


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.benchmarks.engine_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, help="preset (default: llama3-8b on GPU, small on CPU)")
    for name in SIZES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the preset's value")
    add_timing_arguments(p)
    p.add_argument("--tau", type=float, default=6.52,
                   help="acceptance length for the predicted speedup (default: %(default)s, GTO's Llama-3.1-8B "
                        "average)")
    p.add_argument("--engines", default=None,
                   help="comma-separated: eager, graphs (default: eager,graphs on a GPU, eager on a CPU)")
    add_compile_arguments(p)
    p.add_argument("--profile", type=int, default=0, metavar="REPLAYS",
                   help="graphs engine: profile this many replays of each iteration graph and print where "
                        "its GPU time goes, kernel by kernel")
    p.add_argument("--trace", help="with --profile: also keep the Chrome trace here")
    p.add_argument("--sdpa-backend", choices=("auto", "cudnn", "efficient", "flash", "math"), default="auto",
                   help="restrict torch's fused attention to this kernel family (default: torch chooses)")
    p.add_argument("--json", help="write the results here")
    show_defaults(p)
    args = p.parse_args(argv)
    check_compile_arguments(p, args)
    check_output_file(p, "--json", args.json)
    check_output_file(p, "--trace", args.trace)
    check_timing_arguments(p, args)  # (before building a large model)
    if not 1 <= args.tau < float("inf"):  # (nan fails too)
        p.error(f"--tau must be at least 1 (tokens per iteration, the bonus token counted), got {args.tau}")
    on_gpu = args.device.startswith("cuda")
    engines = (args.engines or ("eager,graphs" if on_gpu else "eager")).split(",")
    if any(e not in ("eager", "graphs") for e in engines) or ("graphs" in engines and not on_gpu):
        p.error(f"--engines: choose from eager, graphs (graphs needs a CUDA device), got {args.engines}")
    if len(set(engines)) < len(engines):  # it was timed twice, the table showing the second run only
        p.error(f"--engines {args.engines}: name each engine once")
    args.engines = engines
    # The profile is of the graphs engine's replayed iterations: without it nothing would be profiled.
    if args.profile < 0:
        p.error(f"--profile must be >= 0 (replays to profile; 0: none), got {args.profile}")
    if args.profile and "graphs" not in engines:
        p.error("--profile profiles the graphs engine (CUDA graphs): it needs a CUDA --device and graphs in --engines")
    if args.trace and not args.profile:
        p.error("--trace goes with --profile (it keeps the profile's Chrome trace)")
    if args.trace and args.json and Path(args.trace).resolve() == Path(args.json).resolve():
        p.error(f"--trace and --json name the same file ({args.json}): the results would overwrite the trace")
    if args.sdpa_backend in CUDA_ONLY_SDPA_BACKENDS and not on_gpu:  # (torch finds no kernel: a traceback part-way)
        p.error(f"--sdpa-backend {args.sdpa_backend} runs on a CUDA --device only: on a CPU choose flash or math")
    args.model_shape = pick_shape(p, args)
    return args


def main(argv=None) -> dict:
    """Run the benchmark, print the table; returns (and optionally writes) the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    shape = args.model_shape
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(on_gpu=device.type != "cpu")  # a random model
    total_tokens, engines = args.total_tokens, args.engines

    torch.manual_seed(args.seed)
    model = build_model(shape, device, DTYPES[dtype], TreeParams(total_tokens[0], args.depth, args.top_k))
    prompt = torch.randint(0, shape.vocab_size, (1, args.prompt_length), device=device)
    with torch.no_grad():
        hf_ms = hf_generate_ms(model.base_model, prompt, args.new_tokens, args.repeats)
        with sdpa_backend(args.sdpa_backend):
            compile_engine(model, args)
            result = measure(model, prompt, args.new_tokens, total_tokens, args.repeats, args.max_length, engines,
                             args.profile, args.trace)
    result["hf_generate_ms"] = hf_ms
    for engine in result["engines"].values():
        engine["iterations"] = {str(k): v for k, v in engine["iterations"].items()}
    result.update(
        shape=asdict(shape), device=str(device),
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"cpu, {torch.get_num_threads()} torch threads"),
        dtype=dtype, compiled=args.compile, fused=bool(args.compile) and not args.unfused,
        sdpa_backend=args.sdpa_backend,
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        transformers=__import__("transformers").__version__, prompt_length=args.prompt_length,
        new_tokens=args.new_tokens, repeats=args.repeats, tree={"depth": args.depth, "top_k": args.top_k},
        tau_assumed=args.tau,
    )
    add_ratios(result, args.tau)
    print(format_table(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
