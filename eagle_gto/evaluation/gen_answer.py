"""Answer a benchmark question set and record the speed of every turn.

    python -m eagle_gto.evaluation.gen_answer --bench-name mt_bench \\
        --base-model-path BASE --ea-model-path HEAD --model-type llama3 \\
        --mode ea --answer-file runs/eval/mt_bench/ea.jsonl

One command for every model family (`--model-type` picks the prompt format;
see `eagle_gto.chat`). Without model paths the embedded demo pair is used.
Both modes run the engine's one generation loop (`generate_steps`), with
speculation (`--mode ea`) or without (`--mode baseline`), so the two sides
are timed and counted the same way:

- the prompt is built turn by turn, each answer carried into the next turn
  as the model wrote it (the answer file keeps it stripped, as the
  reference's does): decoded after its prompt, without the space the format
  writes before an answer itself (vicuna's `ASSISTANT: `), with the rest of
  its whitespace;
- before timing, with the timed settings, a step at every attention view a
  turn can reach (on a GPU: every CUDA graph the timed turns replay is
  recorded then), and a few warm-up generations, not recorded;
- wall time covers the whole turn, prefill included (the device is
  synchronised at both ends);
- new_tokens, idxs (iterations - 1; iterations are target forwards, the
  prefill included) and the tokens accepted by every iteration
  (`accept_lengths`: accepted drafts + 1, also where a stop token or the
  token budget cut the step; 1 for the prefill) come from `model.last_stats`.

Answers are appended one line per question in the EAGLE reference's format
(plus `category`, `mode`, per-turn `accept_lengths` and the run's `settings`:
question file, model paths, prompt format, tree, budgets (the context:
--max-length, or the base model's where none is given), sampling, device,
--dtype and `dtype_used`, the dtype it loaded);
question ids already in the answer file are skipped, so an interrupted run
resumes where it stopped. A file holding answers of another --mode,
--model-id or settings is refused, naming what differs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from ..chat import (MODEL_TYPES, answer_lead, answer_text, build_prompt, chat_format, encode_prompt, model_type_arg,
                    stop_token_ids)
from ..cli_help import show_defaults
from ..context_length import base_context
from ..devices import device_problem
from ..dtype_option import add_dtype_option, pick_dtype, resolve_dtype
from ..ea_model import EaModel
from ..tree import check_tree_params
from .questions import BENCHES, answered_ids, append_answer, check_writable, load_questions, question_file, sort_answers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.evaluation.gen_answer", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-name", choices=BENCHES,
                   help="question set read from DATA_DIR (default mt_bench); with --question-file it only "
                        "names the default answer folder")
    p.add_argument("--question-file", help="questions (JSON lines); default DATA_DIR/BENCH/question.jsonl. "
                                           "Without --bench-name its answers are filed under the file's folder "
                                           "(gsm8k for .../gsm8k/question.jsonl) or, for another file name, "
                                           "under that name (mine for mine.jsonl)")
    p.add_argument("--data-dir", help="folder of the question sets; default shared/data beside the repository "
                                      "(not with --question-file)")
    p.add_argument("--base-model-path", help="base model folder or hub id (default: the demo pair)")
    p.add_argument("--ea-model-path", help="draft head folder or hub id (default: the demo pair)")
    p.add_argument("--model-type", type=model_type_arg, choices=MODEL_TYPES, default="auto", help="prompt format")
    p.add_argument("--system", help="system prompt for questions (default: none; the format's own where it has one)")
    p.add_argument("--mode", choices=("ea", "baseline"), default="ea", help="speculative or plain decoding")
    p.add_argument("--model-id", help="name written in the answers (default: base and head names, mode, "
                                      "temperature, tree)")
    p.add_argument("--answer-file", help="output JSON lines (default runs/eval/BENCH/MODEL_ID.jsonl)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--total-token", type=int, default=60, help="draft tree size incl. the root (-1: automatic)")
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per turn")
    p.add_argument("--max-length", type=int,
                   help="context budget: prompt + answer + tree (default: the base model's context, as the servers' "
                        "is: 2048, or its max_position_embeddings or sliding window where smaller)")
    p.add_argument("--limit", type=int, help="answer only the first N questions of the file")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded generations before timing")
    p.add_argument("--seed", type=int, default=0, help="reset before each question (sampling)")
    p.add_argument("--device", "--device-map", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device_map of the base model: cpu, cuda, cuda:1, auto (several GPUs); --device-map is the "
                        "same option, as python -m eagle_gto and the servers name it")
    add_dtype_option(p)
    show_defaults(p)
    args = p.parse_args(argv)

    def refuse(message: str) -> None:  # one line, like a run's errors (argparse's own adds the usage)
        p.exit(2, f"error: {message}\n")

    if args.data_dir and args.question_file:  # the file would be read and the folder silently ignored
        refuse("--data-dir and --question-file both say where the questions are: pass one (--question-file FILE, "
               "or --data-dir DIR with --bench-name for DIR/BENCH/question.jsonl)")
    if (args.base_model_path is None) != (args.ea_model_path is None):  # before the questions are read
        refuse("give both --base-model-path and --ea-model-path, or neither for the demo pair")
    if args.limit is not None and args.limit < 1:
        refuse("--limit must be >= 1")
    if args.max_new_tokens < 1:
        refuse("--max-new-tokens must be >= 1")
    if args.warmup < 0:
        refuse("--warmup must be >= 0")
    if not 0 <= args.temperature < math.inf:  # (nan fails too)
        refuse(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not -2**63 <= args.seed < 2**64:  # torch.manual_seed's range: past it, an overflow once the model has loaded
        refuse(f"--seed {args.seed} is out of range: torch's seeds are integers from {-2**63} to {2**64 - 1}")
    if args.total_token != -1:  # (-1: picked once the model is loaded; Answerer checks the budget then)
        try:
            check_tree_params(args.total_token, args.depth, args.top_k)
        except ValueError as err:
            refuse(str(err))
        if args.max_length is not None and args.max_length - args.max_new_tokens - args.total_token < 1:
            refuse(f"--max-length {args.max_length} leaves no room for a prompt with --max-new-tokens "
                   f"{args.max_new_tokens} and a tree of {args.total_token}")
    problem = device_problem(args.device)
    if problem:
        refuse(f"--device {args.device}: {problem}")
    return args


def on_gpu(device: str) -> bool:
    """Whether the base model goes to a GPU: "auto" places it on the CPU when there is none."""
    return device != "cpu" and torch.cuda.is_available()


def load_model(args: argparse.Namespace):
    dtype = pick_dtype(args.dtype, on_gpu(args.device), args.base_model_path)
    model = EaModel.from_pretrained(args.base_model_path, args.ea_model_path, total_token=args.total_token,
                                    depth=args.depth, top_k=args.top_k, dtype=dtype, device_map=args.device)
    if model.tokenizer is None:
        raise ValueError("the base model has no tokenizer: gen_answer needs one to build and decode prompts")
    return model


def prompt_budget(max_length: int, args: argparse.Namespace, total_token: int) -> int:
    """The tokens a prompt may take: what max_length leaves beside the new tokens and a tree (refused at none)."""
    budget = max_length - args.max_new_tokens - total_token
    if budget < 1:
        context = f"--max-length {max_length}"
        if args.max_length is None:  # (a base trained for 1024 tokens, at the default 1024 new ones)
            context = f"the base model's context, {max_length} tokens (--max-length left out),"
        raise ValueError(f"{context} leaves no room for a prompt with --max-new-tokens {args.max_new_tokens} and a "
                         f"tree of {total_token}: lower --max-new-tokens")
    return budget


def check_room_before_loading(args: argparse.Namespace) -> None:
    """Without --max-length, the refusal Answerer gives once the model has loaded, from the base's config.json
    alone: before the slow load. (A given --max-length is checked with the options; a --total-token -1 tree is
    picked, so checked, after the load.)"""
    context = base_context(args.base_model_path) if args.max_length is None and args.total_token != -1 else None
    if context is not None:
        prompt_budget(context, args, args.total_token)


class Answerer:
    """Generates turns with one model and one set of settings."""

    def __init__(self, model, args: argparse.Namespace):
        self.model = model
        self.args = args
        self.speculative = args.mode == "ea"
        # the servers' context when none is given; a given one is checked by the engine (its first step)
        self.max_length = model.default_max_length() if args.max_length is None else args.max_length
        # checked against the model's rows before any question (the engine would refuse each one)
        self.stops = stop_token_ids(model.tokenizer, args.model_type, model.vocab_size)
        self.is_llama3 = chat_format(args.model_type).is_llama3
        self.lead = answer_lead(args.model_type, model.tokenizer, args.system)
        # Same prompt budget in both modes, with a tree's width to spare: the two sides see
        # identical prompts, and answers end before a draft tree no longer fits (every
        # speculative iteration drafts, as in the reference's runs).
        self.prompt_budget = prompt_budget(self.max_length, args, model.tree.total_token)

    def _sync(self) -> None:
        # Kernels run asynchronously on a GPU: wait for them so wall time is the turn's own.
        if on_gpu(self.args.device):
            for index in range(torch.cuda.device_count()):
                torch.cuda.synchronize(index)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = build_prompt(messages, self.args.model_type, self.model.tokenizer, system=self.args.system)
        ids = encode_prompt(text, self.model.tokenizer, self.args.model_type)
        if len(ids) > self.prompt_budget:
            warnings.warn(f"prompt of {len(ids)} tokens cut to its last {self.prompt_budget} to fit --max-length")
            ids = ids[-self.prompt_budget:]
        return ids

    def generate(self, ids: list[int]) -> tuple[list[int], float]:
        """New tokens of one turn and its wall time (prefill included)."""
        a = self.args
        self._sync()
        start = time.perf_counter()
        tokens: list[int] = []
        for step in self.model.generate_steps(torch.tensor([ids]), temperature=a.temperature,
                                              max_new_tokens=a.max_new_tokens, max_length=self.max_length,
                                              is_llama3=self.is_llama3, stop_token_ids=self.stops,
                                              speculative=self.speculative):
            tokens += step.tokens
        self._sync()
        return tokens, time.perf_counter() - start

    def answer(self, question: dict) -> dict:
        """One choice in the reference's format, plus per-turn accept_lengths."""
        torch.manual_seed(self.args.seed)
        messages: list[dict] = []
        choice = {"index": 0, "turns": [], "idxs": [], "new_tokens": [], "wall_time": [], "accept_lengths": []}
        for turn in question["turns"]:
            messages.append({"role": "user", "content": turn})
            prompt = self.prompt_ids(messages)
            tokens, seconds = self.generate(prompt)
            stats = self.model.last_stats
            text = answer_text(self.model.tokenizer, prompt, tokens, self.lead,
                               chat_format(self.args.model_type).stop_strings)
            # The next turn's prompt continues what the model wrote: stripping would change it
            # (a final newline, a leading space in the plain format).
            messages.append({"role": "assistant", "content": text})
            choice["turns"].append(text.strip())
            choice["idxs"].append(stats.iterations - 1)
            choice["new_tokens"].append(stats.new_tokens)
            choice["wall_time"].append(seconds)
            # What each iteration accepted: a step cut by a stop token or the budget is no shorter acceptance.
            choice["accept_lengths"].append([s.num_accepted + 1 for s in stats.steps])
        return choice

    def warm_up(self, question: dict) -> None:
        """Before timing, with the timed settings (mode, sampling, stops,
        max_length): a step at every attention view a turn can reach
        (`EaModel.warm_up`: on a GPU, the CUDA graphs the timed turns replay
        are recorded here, long prompts' too), then unrecorded generations
        through `generate`. --warmup 0 skips both."""
        a = self.args
        if a.warmup == 0:
            return
        self.model.warm_up(max_length=self.max_length, temperature=a.temperature, speculative=self.speculative)
        ids = self.prompt_ids([{"role": "user", "content": question["turns"][0]}])
        for _ in tqdm(range(a.warmup), desc="warm-up", leave=False):
            self.generate(ids)


def default_model_id(args: argparse.Namespace) -> str:
    """E.g. `Llama-3-8B-EAGLE3-ea-temperature-0.0-tree-60-7-10` (folder names of
    the base and the head; `demo` for the demo pair; `auto` for --total-token -1)."""
    names = [Path(path).name for path in (args.base_model_path, args.ea_model_path) if path] or ["demo"]
    total_token = "auto" if args.total_token == -1 else args.total_token
    return (f"{'-'.join(names)}-{args.mode}-temperature-{args.temperature}"
            f"-tree-{total_token}-{args.depth}-{args.top_k}")


def run_settings(args: argparse.Namespace, questions_path: Path) -> dict:
    """What the answers depend on besides the mode and model id, recorded in
    every answer: a file is resumed only with the same. The question file is
    named by its folder and name (e.g. gsm8k/question.jsonl), so that a run
    resumes from another data directory (resolved first: a relative
    question.jsonl has no folder of its own)."""
    questions_path = questions_path.resolve()
    settings = {"question_file": f"{questions_path.parent.name}/{questions_path.name}",
                "base_model_path": args.base_model_path, "ea_model_path": args.ea_model_path,
                "model_type": args.model_type, "system": args.system, "temperature": args.temperature,
                "seed": args.seed, "total_token": args.total_token, "depth": args.depth, "top_k": args.top_k,
                "max_new_tokens": args.max_new_tokens, "max_length": args.max_length,
                "device": args.device, "dtype": args.dtype,
                # what --dtype loaded: auto's dtype depends on the machine and the checkpoint (and was bfloat16 on
                # every GPU in answer files that record no dtype_used, which resume and pair as before)
                "dtype_used": resolve_dtype(args.dtype, on_gpu(args.device), args.base_model_path)}
    if args.max_length is None:  # the base's context: known once the model is loaded
        del settings["max_length"]
    return settings


def bench_label(args: argparse.Namespace) -> str:
    """The bench the answers are filed under (runs/eval/BENCH/): --bench-name, else
    the --question-file's own set: its folder in the data-dir layout
    (gsm8k/question.jsonl -> gsm8k), else its name (mine.jsonl -> mine)."""
    if args.bench_name:
        return args.bench_name
    if not args.question_file:
        return "mt_bench"
    path = Path(args.question_file).resolve()
    return path.parent.name if path.name == "question.jsonl" else path.stem


def main(argv=None) -> Path:
    """Run the benchmark; returns the answer file's path. Bad input raises ValueError
    (OSError for files that cannot be read or written)."""
    args = parse_args(argv)
    bench = bench_label(args)
    questions_path = Path(args.question_file) if args.question_file else question_file(bench, args.data_dir)
    model_id = args.model_id or default_model_id(args)
    answer_file = Path(args.answer_file or Path("runs", "eval", bench, f"{model_id}.jsonl"))
    questions = load_questions(questions_path, args.limit)
    settings = run_settings(args, questions_path)
    done = answered_ids(answer_file, {"mode": args.mode, "model_id": model_id, **settings})
    todo = [q for q in questions if q["question_id"] not in done]
    print(f"{len(questions)} questions from {questions_path}; {len(questions) - len(todo)} already in {answer_file}")
    if not todo:
        return answer_file

    check_writable(answer_file)
    check_room_before_loading(args)
    model = load_model(args)
    answerer = Answerer(model, args)
    # Known now, one of each per file: the base's context (without --max-length; answer files made before it
    # was the default recorded 2048) and a tree picked by timing (it may differ between runs)
    settings["max_length"] = answerer.max_length
    if args.total_token == -1:
        settings["total_token_used"] = model.tree.total_token
    notes = {"max_length": "--max-length left out: the base model's context; give the file's to resume it"}
    answered_ids(answer_file, settings, notes if args.max_length is None else None)
    with torch.no_grad():
        answerer.warm_up(todo[0])
        for question in tqdm(todo, desc=f"{bench} {args.mode}"):
            record = {"question_id": question["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                      "category": question.get("category"), "mode": args.mode, "settings": settings,
                      "choices": [answerer.answer(question)], "tstamp": time.time()}
            append_answer(answer_file, record)
    sort_answers(answer_file)
    print(f"answers written to {answer_file}")
    return answer_file


def cli(argv=None) -> int:
    """The command line: bad input ends in one line `error: ...` and exit status 2."""
    try:
        main(argv)
    except (ValueError, OSError) as err:  # CheckpointError included; OSError: a file that cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
