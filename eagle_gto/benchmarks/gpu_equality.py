"""Greedy equality of the engine's decoding paths on a GPU.

    python -m eagle_gto.benchmarks.gpu_equality [--shape llama3-8b] [--new-tokens 128] [--json OUT]

For the demo pair (bfloat16) and a random-weight model of `--shape` (float32,
then the same weights in bfloat16), each prompt is decoded greedily four
ways: plain eager (the reference), plain with CUDA graphs, speculative eager
and speculative with CUDA graphs. A path that leaves the reference is
reported with the first differing position and the tie margin there: the
two tokens' logits from one full forward over the common prefix (no cache),
in units of the logits' rounding step (ulp). Sums taken in a different order
(a tree forward against a one-token forward) can flip only a near-tie, a
margin of a few ulp; anything wider is a bug. float32 runs must agree.
"""

from __future__ import annotations

import argparse
import math

import torch

from ..cli_help import show_defaults
from ..ea_model import EaModel
from ..generation import TreeParams
from ..placement import attach_head
from .common import check_output_file, write_json
from .engine_overhead import add_compile_arguments, build_model, check_compile_arguments, compile_engine
from .shapes import SHAPES

PATHS = (("plain", False, False), ("plain", True, True), ("speculative", True, False), ("speculative", True, True))
DEMO_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\nclass Config:\n", "def parse_args(argv=None):\n    \"\"\"",
                "    for index, line in enumerate(lines):\n")


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype` numbers around `value`."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(abs(value), 1e-30)))


@torch.no_grad()
def tie_margin(model: EaModel, tokens: list[int], position: int, expected: int, got: int) -> dict:
    logits = model.base_model(torch.tensor([tokens[:position]], device=model._target.input_device)).logits[0, -1]
    top = float(logits.max())
    margin = float(logits[expected] - logits[got])
    return {"margin": margin, "top_logit": top, "margin_ulp": margin / ulp(top, logits.dtype)}


def decode(model: EaModel, prompt: torch.Tensor, path: tuple, new_tokens: int) -> tuple[list[int], float]:
    kind, _, graphs = path
    model.cuda_graphs = graphs
    run = model.eagenerate if kind == "speculative" else model.naivegenerate
    out = run(prompt, max_new_tokens=new_tokens)
    return out[0].tolist(), model.last_stats.mean_accepted_length


def check(model: EaModel, name: str, prompts: list[torch.Tensor], new_tokens: int,
          args: argparse.Namespace) -> list[dict]:
    """Each path against plain eager decoding; with `--compile`, the paths run
    compiled (`EaModel.enable_torch_compile`) against the model as it was
    before: uncompiled for the demo and the float32 pass, while the bfloat16
    pass reuses the float32 pass's base, whose layers stay compiled."""
    references = [decode(model, prompt, PATHS[0], new_tokens)[0] for prompt in prompts]
    if args.compile:
        compile_engine(model, args)
        name += f", compiled ({args.compile})"
    rows = []
    for number, (prompt, reference) in enumerate(zip(prompts, references)):
        for path in PATHS[1:] if not args.compile else PATHS:
            tokens, tau = decode(model, prompt, path, new_tokens)
            row = {"model": name, "prompt": number, "path": f"{path[0]}, {'graphs' if path[2] else 'eager'}",
                   "tau": round(tau, 2), "first_difference": first_difference(reference, tokens)}
            at = row["first_difference"]
            if at is not None and at < min(len(reference), len(tokens)):
                row.update(tie_margin(model, reference, at, reference[at], tokens[at]))
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.benchmarks.gpu_equality",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=2, help="random prompts for the random-weight model")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--float32-only", action="store_true", help="skip the bfloat16 pass of the random model")
    add_compile_arguments(p)
    p.add_argument("--json")
    show_defaults(p)
    args = p.parse_args(argv)
    check_compile_arguments(p, args)
    check_output_file(p, "--json", args.json)
    for option in ("--new-tokens", "--prompts"):  # (no prompt or no token: nothing compared, an empty table)
        value = getattr(args, option[2:].replace("-", "_"))
        if value < 1:
            p.error(f"{option} must be >= 1, got {value}")
    if not torch.cuda.is_available():
        p.error("this check compares decoding paths on a CUDA GPU, and CUDA is not available here "
                "(the CPU test suite checks the same equalities in float32: python -m pytest)")
    device = torch.device("cuda")
    rows = []
    if not args.skip_demo:
        demo = EaModel.from_pretrained(torch_dtype=torch.bfloat16, device_map=str(device))
        prompts = [demo.tokenizer(text, return_tensors="pt").input_ids.to(device) for text in DEMO_PROMPTS]
        rows += check(demo, "demo pair, bfloat16", prompts, args.new_tokens, args)
        del demo
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    model = build_model(shape, device, torch.float32, TreeParams())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, shape.vocab_size, (1, 32), generator=g).to(device) for _ in range(args.prompts)]
    rows += check(model, f"random {args.shape}, float32", prompts, args.new_tokens, args)
    if not args.float32_only:
        base, head = model.base_model.to(torch.bfloat16), model.ea_layer
        attach_head(base, head)  # casts the head and re-attaches the (now bfloat16) embedding
        del model
        model = EaModel(base, head, None)
        rows += check(model, f"random {args.shape}, bfloat16", prompts, args.new_tokens, args)
    report(rows, args.json)
    return rows


def report(rows: list[dict], json_path: str | None) -> None:
    """Print the rows as a table; write them to `json_path` (its folders made, as the other benchmarks do)."""
    print("\n| model | prompt | path | tau | first difference | margin (ulp) |\n|---|---|---|---|---|---|")
    for r in rows:
        margin = f"{r['margin']:.4g} ({r['margin_ulp']:.1f})" if "margin" in r else ""
        print(f"| {r['model']} | {r['prompt']} | {r['path']} | {r['tau']} | "
              f"{'-' if r['first_difference'] is None else r['first_difference']} | {margin} |")
    write_json(json_path, rows)


if __name__ == "__main__":
    main()
