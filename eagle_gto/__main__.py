"""`python -m eagle_gto`: generate with speculative decoding and compare with
plain decoding side by side. With no model paths it runs the embedded demo
pair (a small Python-code model and its draft head), offline."""

from __future__ import annotations

import argparse
import sys

import torch

from . import EaModel, GenerationStats
from .acceptance import SamplingParams
from .chat import MODEL_TYPES, answer_text, build_prompt, chat_format, encode_prompt, model_type_arg, stop_token_ids
from .cli_help import show_defaults
from .dtype_option import add_dtype_option, pick_dtype

DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eagle_gto", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model-path", help="base model folder or hub id (default: the demo pair)")
    p.add_argument("--ea-model-path", help="draft head folder or hub id (default: the demo pair)")
    p.add_argument("--model-type", type=model_type_arg, default="auto", choices=MODEL_TYPES,
                   help="chat template; 'plain' sends the prompt as is (default: auto)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="the prompt (a user message for chat models; default: a Python function header)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="up to 1e-5: greedy")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling; 0 (or 1 and above): off")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k, 0: off (not the tree's: --tree-top-k)")
    p.add_argument("--total-token", type=int, default=60, help="draft tree size incl. the root (-1: auto)")
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--tree-top-k", type=int, default=10)
    add_dtype_option(p)
    p.add_argument("--device-map", "--device", default=None,
                   help='e.g. "cpu", "cuda:1", "auto" to shard over GPUs, "none" for no device map; --device is the '
                        'same option, as gen_answer names it (default: "cuda" on CUDA, else none)')
    p.add_argument("--no-compare", action="store_true", help="skip the plain-decoding run")
    show_defaults(p)
    args = p.parse_args(argv)
    if (args.base_model_path is None) != (args.ea_model_path is None):  # (as the servers say it, by option)
        p.error("give both --base-model-path and --ea-model-path, or neither for the demo pair")
    return args


def check_text(prompt: str) -> None:
    """Python passes command-line bytes that are not UTF-8 on as lone surrogates, which no tokenizer takes."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        char = prompt[err.start]
        byte = f"byte {ord(char) - 0xDC00:#x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        raise ValueError(f"the prompt is not UTF-8 text: {byte} at character {err.start}") from None


def load_model(args) -> EaModel:
    # "none": no device map, the model stays on the CPU (as the web UI and API servers read it)
    device_map = args.device_map or ("cuda" if torch.cuda.is_available() else "none")
    on_gpu = torch.cuda.is_available() and device_map not in ("none", "cpu")
    kwargs = dict(dtype=pick_dtype(args.dtype, on_gpu, args.base_model_path))
    if device_map != "none":
        kwargs["device_map"] = device_map
    return EaModel.from_pretrained(args.base_model_path, args.ea_model_path, total_token=args.total_token,
                                   depth=args.depth, top_k=args.tree_top_k, **kwargs)


def first_tokens(stats: GenerationStats, count: int) -> GenerationStats:
    """The record of the iterations that made a generation's first `count` tokens (a speculative one's last
    iteration may make a few more)."""
    steps, made = [], 0
    for step in stats.steps:
        if made >= count:
            break
        steps.append(step)
        made += len(step.tokens)
    return GenerationStats(stats.prompt_length, steps)


def same_length_rows(spec: GenerationStats, plain: GenerationStats) -> list[tuple[str, GenerationStats]]:
    """Sampled, the two runs write different answers, of different lengths: one that stops after 2 tokens is
    mostly its prefill, and its tokens/s says little against a 24-token one. Both are timed over their first
    tokens, as many as the shorter answer has."""
    common = min(spec.new_tokens, plain.new_tokens)
    print(f"(sampling: each run drew its own answer, of {spec.new_tokens} and {plain.new_tokens} tokens; both are "
          f"timed over the iterations that made their first {common}, prefill included. The speedup varies from "
          "sample to sample: --temperature 0, or gen_answer over a question set, gives a steady one)")
    return [("speculative", first_tokens(spec, common)), ("plain", first_tokens(plain, common))]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # The generation settings are checked before the model loads (the engine would refuse them later).
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
        sampling.validate()
        if args.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
        check_text(args.prompt)
        if args.top_k and sampling.greedy:
            # The other commands' --top-k is the tree's: copied here, it would silently do nothing.
            print(f"warning: --top-k {args.top_k} is the sampling top-k here, and greedy decoding (--temperature "
                  f"{args.temperature:g}) does not sample; the draft tree's is --tree-top-k", file=sys.stderr)
        model = load_model(args)
    except ValueError as err:  # CheckpointError included: the message names the file and the problem
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = model.tokenizer
    if tokenizer is None:
        print("the base model has no tokenizer; use the Python API with token ids", file=sys.stderr)
        return 2
    text = build_prompt([{"role": "user", "content": args.prompt}], args.model_type, tokenizer)
    ids = torch.tensor([encode_prompt(text, tokenizer, args.model_type)])
    context = model.default_max_length()
    if ids.shape[1] == 0:  # a tokenizer that adds no BOS, and no chat template around the prompt
        print("error: the prompt encodes to no tokens: give a non-empty --prompt", file=sys.stderr)
        return 2
    if ids.shape[1] + 1 > context:
        print(f"error: the prompt has {ids.shape[1]} tokens, too many for the context of {context} tokens "
              "(one more is needed for the answer); shorten it", file=sys.stderr)
        return 2
    options = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens, is_llama3=chat_format(args.model_type).is_llama3,
                   stop_token_ids=stop_token_ids(tokenizer, args.model_type))
    # Warm up each timed path with its settings, as gen_answer does: on a GPU a step's CUDA graph is
    # recorded per mode, sampling setting and 256-slot attention view, and model.warm_up records every
    # view the context can reach (recording must not be timed); a short generation then pays the
    # first-call costs it leaves (the prefill; on a CPU, where it runs nothing, all of them).
    warm_ups = [(True, model.eagenerate)] + ([] if args.no_compare else [(False, model.naivegenerate)])
    for speculative, warm_up in warm_ups:
        model.warm_up(max_length=context, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      speculative=speculative)
        warm_up(ids, **{**options, "max_new_tokens": 8})
    out = model.eagenerate(ids, **options)
    spec = model.last_stats
    print(args.prompt, end="")
    # As the servers and gen_answer write an answer: decoded after the prompt (a SentencePiece decoder alone drops
    # the first word's space) and cut before the format's stop string.
    print(answer_text(tokenizer, ids[0].tolist(), out[0, ids.shape[1]:].tolist(),
                      stop_strings=chat_format(args.model_type).stop_strings))
    print("-" * 60)
    if spec.finish_reason == "length" and spec.new_tokens < args.max_new_tokens:
        print(f"(the answer ended where the context of {context} tokens is full)")
    rows = [("speculative", spec)]
    if not args.no_compare:
        plain = model.naivegenerate(ids, **options)
        if sampling.greedy:  # the same answer (a temperature up to 1e-5 is greedy): each run is timed whole
            print(f"greedy outputs identical: {'yes' if plain.tolist() == out.tolist() else 'NO'}")
            rows.append(("plain", model.last_stats))
        else:
            rows = same_length_rows(spec, model.last_stats)
    print(f"{'decoding':<12} {'tokens':>6} {'iterations':>10} {'tau':>6} {'tokens/s':>9}")
    for name, st in rows:
        print(f"{name:<12} {st.new_tokens:>6} {st.iterations:>10} {st.mean_accepted_length:>6.2f} "
              f"{st.tokens_per_second:>9.1f}")
    if len(rows) == 2 and rows[0][1].iterations == 1:  # the prefill alone: no draft was verified
        print("no speedup to show: the runs compare over one token, which each makes with its prefill alone (an "
              "answer of one token; sampled, run again)")
    elif len(rows) == 2:
        (_, timed), (_, plain_stats) = rows
        device = next(model.base_model.parameters()).device.type
        print(f"speedup {timed.tokens_per_second / plain_stats.tokens_per_second:.2f}x "
              f"({device.upper()}, tree {model.tree.total_token}/{model.tree.depth}/{model.tree.top_k})")
        # speedup = tau / (what an iteration costs in plain steps)
        iteration_cost = (timed.seconds / timed.iterations) / (plain_stats.seconds / plain_stats.iterations)
        print(f"an iteration cost {iteration_cost:.1f} plain steps and produced tau = "
              f"{timed.mean_accepted_length:.2f} tokens")
        if device == "cpu":
            print("(a CPU computes a forward over the tree's tokens at several times a step's cost; on a GPU,\n"
                  " where a step is bound by reading the weights, an iteration costs about two: README, Benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
