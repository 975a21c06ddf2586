"""Build the demo EAGLE-3 head for the demo base model.

    python -m eagle_gto.demo.build_head [--base DIR] [--out DIR] [--steps N] [--seed S]

Training data (all from the train split of the stdlib files, so the held-out
files stay unseen by both models):
- the base model's own greedy continuations (`--new-tokens`) of random
  `--prompt-tokens`-token windows: what the head must predict at decoding
  time is exactly what the base writes, and a head trained on its target's
  outputs accepts more;
- random windows of the stdlib text itself, for variety.
Every token carries loss: the training target is the base's own
distribution at each position, exact on real and on generated text alike.
The head (hidden size of the base, draft vocabulary of the most frequent
`--draft-vocab-size` tokens) is trained with `eagle_gto.train` and stored as
float16 in `--out` with its training log and curves. About 15 minutes on
two CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from ..cli_help import show_defaults
from ..train import Sample, TrainConfig, train
from ..train.data import greedy_continue
from . import ASSETS
from .corpus import read_texts, stdlib_files


def stdlib_stream(tokenizer, split: str) -> torch.Tensor:
    """The split's files as one id stream, each file as <s> ... </s> (the
    tokenizer adds <s>), the way the base model was trained."""
    ids: list[int] = []
    for encoded in tokenizer(read_texts(stdlib_files(split)), verbose=False)["input_ids"]:
        ids += encoded + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def windows(stream: torch.Tensor, count: int, length: int, generator: torch.Generator) -> list[list[int]]:
    starts = torch.randint(0, len(stream) - length, (count,), generator=generator)
    return [stream[s : s + length].tolist() for s in starts.tolist()]


def build_samples(base, tokenizer, generated: int, texts: int, prompt_tokens: int, new_tokens: int,
                  seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    stream = stdlib_stream(tokenizer, "train")
    prompts = windows(stream, generated, prompt_tokens, generator)
    continuations = greedy_continue(base, prompts, new_tokens, {tokenizer.eos_token_id}, batch_size=64)
    samples = [Sample(p + c, [1] * (len(p) + len(c))) for p, c in zip(prompts, continuations)]
    samples += [Sample(w, [1] * len(w)) for w in windows(stream, texts, prompt_tokens + new_tokens, generator)]
    return samples


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.demo.build_head",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=ASSETS / "base", help="demo base model folder")
    p.add_argument("--out", type=Path, default=ASSETS / "eagle3", help="where the head goes")
    p.add_argument("--generated", type=int, default=1536, help="greedy continuations to train on")
    p.add_argument("--texts", type=int, default=256, help="stdlib text windows to train on")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-vocab-size", type=int, default=1024)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=280, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ttt-steps", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    show_defaults(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    started = time.time()
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    samples = build_samples(base, tokenizer, args.generated, args.texts, args.prompt_tokens, args.new_tokens,
                            args.seed)
    data_seconds = time.time() - started
    tokens = sum(len(s.input_ids) for s in samples)
    print(f"data: {len(samples)} sequences, {tokens:,} tokens in {data_seconds:.0f} s")
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=0.05,
                      warmup_ratio=0.05, max_grad_norm=1.0, ttt_steps=args.ttt_steps, seed=args.seed,
                      save_every=args.steps, keep_checkpoints=1, log_every=10, export_dtype="float16")
    with tempfile.TemporaryDirectory() as work:
        train(base, samples, work, cfg, args.draft_vocab_size, args.intermediate_size)
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "training_curves.png", "metrics.jsonl"):
            if name != "training_curves.png" or (Path(work) / name).is_file():  # no plot without matplotlib
                shutil.copy(Path(work) / name, args.out / name)
    metrics = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    log = {
        "command": "python -m eagle_gto.demo.build_head " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        # The head only fits the base it was trained for: this names that base.
        "base_sha256": hashlib.sha256((args.base / "model.safetensors").read_bytes()).hexdigest(),
        "train_config": cfg.__dict__,
        "sequences": len(samples),
        "tokens": tokens,
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(time.time() - started - data_seconds, 1),
        "final": metrics[-1],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (args.out / "README.md").write_text(README.format(
        command=log["command"], generated=args.generated, texts=args.texts, prompt=args.prompt_tokens,
        new=args.new_tokens, tokens=tokens, vocab=args.draft_vocab_size, steps=args.steps, batch=args.batch_size,
        ttt=args.ttt_steps, minutes=(time.time() - started) / 60, acc=", ".join(f"{a:.2f}" for a in metrics[-1]["acc"]),
    ))
    print(f"head written to {args.out}: final loss {metrics[-1]['loss']}, per-step accuracy {metrics[-1]['acc']}")


README = """# Demo EAGLE-3 head

The draft head of the demo pair, for the base model in `../base`. Built with:

    {command}

- Data: the base model's greedy {new}-token continuations of {generated} random {prompt}-token windows of
  the train-split stdlib files, plus {texts} windows of the stdlib text itself ({tokens:,} tokens).
- Head: EAGLE-3 (one layer, hidden size of the base), draft vocabulary of the {vocab} most frequent
  tokens; float16 weights.
- Training: `eagle_gto.train`, {steps} AdamW steps of {batch} sequences, training-time test unrolled
  {ttt} steps, {minutes:.1f} minutes in all on the CPU.
- Final training accuracy per unroll step: {acc}.

`training_log.json` has the details (and the hash of the base it was trained for), `metrics.jsonl` and
`training_curves.png` the curves. Measure it with `python -m eagle_gto.demo.measure`.
"""


if __name__ == "__main__":
    main()
