"""Measure the demo pair: acceptance length and speedup over plain decoding.

    python -m eagle_gto.demo.measure [--head eagle3|gto] [--humaneval FILE] [--limit N]

Two prompt sets: the first `--prompt-tokens` tokens of every held-out stdlib
file (unseen by both models), and the HumanEval questions (the turn text as
plain text; the demo base is a plain code LM). Each prompt is generated
greedily both ways, speculative and plain, side by side in this one run, and
the outputs are checked to be identical. Printed per set: tau (generated
tokens / target forwards, the bonus token counted) and tokens/s of both ways;
speedup = mean tokens/s speculative / mean tokens/s plain, as the EAGLE
reference and `eagle_gto.evaluation.speed` compute it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli_help import show_defaults
from ..evaluation.questions import load_questions
from ..evaluation.speed import mean, reference_speedup
from . import demo_paths
from .corpus import read_texts, stdlib_files

DEFAULT_HUMANEVAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "humaneval" / "question.jsonl"


def heldout_prompts(tokenizer, prompt_tokens: int = 64) -> list[list[int]]:
    # Truncated by the tokenizer: whole files, longer than the model's context, raise no length warning.
    return [tokenizer(text, truncation=True, max_length=prompt_tokens).input_ids
            for text in read_texts(stdlib_files("heldout"))]


def first_turns(questions: list[dict], tokenizer) -> list[list[int]]:
    return [tokenizer(question["turns"][0]).input_ids for question in questions]


def humaneval_prompts(path: str | Path, tokenizer) -> list[list[int]]:
    """The first turn of each question; a file gen_answer would refuse is a ValueError naming it."""
    return first_turns(load_questions(path), tokenizer)


@dataclass
class Result:
    prompts: int
    tau: float  # mean accepted length over all iterations of the set
    spec_tps: float  # mean over prompts of tokens/s, speculative
    plain_tps: float  # the same, plain decoding
    identical: int  # prompts whose speculative output equals the plain one
    speedup: float  # spec_tps / plain_tps


def measure(model, prompts: list[list[int]], max_new_tokens: int = 128) -> Result:
    new_tokens = iterations = identical = 0
    spec_tps, plain_tps = [], []
    for warm_up in (model.eagenerate, model.naivegenerate):  # first-call costs stay out of the timed runs
        warm_up(torch.tensor([prompts[0]]), max_new_tokens=8)
    for prompt in prompts:
        ids = torch.tensor([prompt])
        spec = model.eagenerate(ids, max_new_tokens=max_new_tokens)
        stats = model.last_stats
        new_tokens, iterations = new_tokens + stats.new_tokens, iterations + stats.iterations
        spec_tps.append(stats.tokens_per_second)
        plain = model.naivegenerate(ids, max_new_tokens=max_new_tokens)
        plain_tps.append(model.last_stats.tokens_per_second)
        identical += int(torch.equal(spec, plain))
    return Result(len(prompts), new_tokens / iterations, mean(spec_tps), mean(plain_tps), identical,
                  reference_speedup(spec_tps, plain_tps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.demo.measure",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", choices=("eagle3", "gto"), help="demo head (default: the better one)")
    p.add_argument("--base-model-path", help="measure another pair: its base (with --ea-model-path)")
    p.add_argument("--ea-model-path", help="measure another pair: its head")
    p.add_argument("--humaneval", type=Path, default=DEFAULT_HUMANEVAL, help="HumanEval question.jsonl")
    p.add_argument("--limit", type=int, help="at most this many prompts per set")
    p.add_argument("--prompt-tokens", type=int, default=64, help="held-out prompt length")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--total-token", type=int, default=60, help="draft tree size incl. the root (-1: automatic)")
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    show_defaults(p)
    args = p.parse_args(argv)
    for name in ("limit", "prompt_tokens", "max_new_tokens", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    base, head = args.base_model_path, args.ea_model_path
    if bool(base) != bool(head):
        p.error("give both --base-model-path and --ea-model-path, or neither for the demo pair")
    if base and args.head:
        p.error("--head picks a head of the demo pair: leave it out with --base-model-path and --ea-model-path")
    from .. import EaModel

    torch.set_num_threads(args.threads)
    if not base:
        base, head = demo_paths(args.head)
    humaneval = None
    try:
        if args.humaneval.is_file():  # read first: a bad file fails before the model loads, not after a set ran
            humaneval = load_questions(args.humaneval)
        model = EaModel.from_pretrained(base, head, total_token=args.total_token, depth=args.depth,
                                        top_k=args.top_k, dtype=torch.float32)
    except ValueError as err:  # CheckpointError included: the message names the file and the problem
        print(f"error: {err}", file=sys.stderr)
        return 2
    sets = {"held-out stdlib": heldout_prompts(model.tokenizer, args.prompt_tokens)}
    if humaneval is not None:
        sets["HumanEval"] = first_turns(humaneval, model.tokenizer)
    else:
        print(f"{args.humaneval} not found: HumanEval skipped")
    tree = model.tree  # total_token -1 is picked when the model loads
    print(f"pair {base} + {head}; total_token={tree.total_token} depth={tree.depth} top_k={tree.top_k}, "
          f"greedy, {args.max_new_tokens} new tokens, {torch.get_num_threads()} CPU threads")
    print(f"| {'prompts':<16} | {'n':>3} | {'tau':>5} | {'spec tok/s':>10} | {'plain tok/s':>11} "
          f"| {'speedup':>7} | identical |")
    print(f"|{'-' * 18}|{'-' * 5}|{'-' * 7}|{'-' * 12}|{'-' * 13}|{'-' * 9}|-----------|")
    for name, prompts in sets.items():
        r = measure(model, prompts[: args.limit], args.max_new_tokens)
        print(f"| {name:<16} | {r.prompts:>3} | {r.tau:>5.2f} | {r.spec_tps:>10.1f} | {r.plain_tps:>11.1f} | "
              f"{r.speedup:>6.2f}x | {r.identical:>4}/{r.prompts:<4} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
