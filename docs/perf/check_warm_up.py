"""GPU check for issue 7 (run by `gpu-session.sh 11`): after `warm_up`, a
generation to the end of the context records no new CUDA graph, and the
first generation after warm-up is as fast as the second. With --server, also
the time a server takes from start to ready (model, caches, warm-up) on the
demo pair, with and without --torch-compile.

    python docs/perf/check_warm_up.py [--shape small] [--max-length 2048] [--compile] [--server] [--json OUT]

`--device cpu` is a dry run of the same calls (no graphs there, so nothing is checked), to find a broken
argument or API here before a lent GPU's minutes are spent on it.
"""

from __future__ import annotations

import argparse
import time

import torch

from eagle_gto.benchmarks.common import check_device, check_output_file, synchronize, write_json
from eagle_gto.benchmarks.engine_overhead import (add_compile_arguments, build_model, check_compile_arguments,
                                                  compile_engine)
from eagle_gto.benchmarks.shapes import SHAPES
from eagle_gto.generation import TreeParams


def timed(fn, device: torch.device) -> tuple[object, float]:
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


def server_start_up(options: list[str], device: torch.device) -> dict:
    """What a server does before its first request (`load_runner`), timed."""
    from application.server_options import build_parser, load_runner

    parser = build_parser("start-up", "", 8000)
    runner, seconds = timed(lambda: load_runner(parser, parser.parse_args(options)), device)
    return {"options": options, "start_up_s": round(seconds, 1), "graphs": len(runner.model._graphs or ())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (default: cuda)")
    add_compile_arguments(p)
    p.add_argument("--server", action="store_true", help="also time a server's start-up (demo pair)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    check_compile_arguments(p, args)
    check_device(p, args.device)
    check_output_file(p, "--json", args.json)
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"--device {device}: a dry run (CUDA graphs are what this checks)", flush=True)
    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # (half precision is slow on a CPU)
    model = build_model(shape, device, dtype, TreeParams(60, 7, 10))
    compile_engine(model, args)
    prompt = torch.randint(0, shape.vocab_size, (1, args.prompt_length), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    result = {"shape": args.shape, "device": str(device), "max_length": args.max_length, "compile": args.compile,
              "runs": []}
    for speculative in (True, False):
        steps, warm_s = timed(lambda: model.warm_up(args.max_length, speculative=speculative), device)
        graphs_warm = len(model._graphs or ())
        generate = model.eagenerate if speculative else model.naivegenerate
        seconds = []
        for _ in range(2):  # (random weights and no end-of-sequence token: each runs to max_length)
            out, s = timed(lambda: generate(prompt, max_new_tokens=args.max_length, max_length=args.max_length),
                           device)
            seconds.append(s)
        run = {"speculative": speculative, "warm_up_steps": steps, "warm_up_s": round(warm_s, 2),
               "graphs_after_warm_up": graphs_warm, "graphs_after_generations": len(model._graphs or ()),
               "new_tokens": out.shape[1] - args.prompt_length, "first_s": round(seconds[0], 3),
               "second_s": round(seconds[1], 3)}
        run["no_new_graphs"] = run["graphs_after_generations"] == graphs_warm
        result["runs"].append(run)
        print(run, flush=True)
    if args.server:
        # (the servers' own default placement: the GPU where there is one, else the CPU)
        result["server"] = [server_start_up(options, device) for options in ([], ["--torch-compile"])]
        print(result["server"], flush=True)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
