"""Train an EAGLE-3 draft head for a base model, with training-time test.

    python -m eagle_gto.train --base-model-path BASE --data train.jsonl --out DIR [options]

Per optimizer step: the base model runs on the batch (features.py), the head
is unrolled `--ttt-steps` times on its own outputs against the target's
distribution (ttt.py), AdamW updates it with gradient clipping under a
warm-up + cosine learning rate. accelerate places everything (multi-GPU with
`accelerate launch`), bf16 autocast on GPU, fp32 on CPU. Checkpoints in
DIR/checkpoints/ resume with `--resume` (without it, a DIR that holds
checkpoints, a run stopped before its first or an exported head is refused;
with it, checkpoints of a head of another shape, of other options or of
other data are; Ctrl-C says how to go on); metrics go to DIR/metrics.jsonl and
DIR/training_curves.png; the head is exported to DIR as an EAGLE-3
checkpoint (`EaModel.from_pretrained(BASE, DIR)` loads it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..chat import MODEL_TYPES, eos_ids, model_type_arg
from ..cli_help import show_defaults
from ..dtype_option import pick_dtype
from ..head_config import HeadConfig
from .checkpoints import interrupted
from .config import DTYPES, TrainConfig
from .data import Sample, check_prompts, read_numbered_records, regenerate, to_samples
from .errors import checks_said_once, errors_said_once
from .head_init import check_head_sizes, head_config_for, head_options, text_config
from .outputs import STARTED_OUTPUTS, check_writable
from .processes import is_main_process, process_state
from .resume import previous_checkpoints, records_fingerprint, run_options
from .trainer import train

PROG = "python -m eagle_gto.train"
REGEN_DEFAULTS = {"regen_max_new_tokens": 512, "regen_batch_size": 16}  # (options of --regenerate only)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model-path", required=True, help="base model folder or hub id")
    p.add_argument("--data", required=True, nargs="+", help="training jsonl file(s)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, exported head)")
    p.add_argument("--eval-data", nargs="+", help="held-out jsonl file(s) for loss / per-step accuracy")
    p.add_argument("--model-type", type=model_type_arg, default="auto", choices=MODEL_TYPES,
                   help="conversation format (default: auto, the tokenizer's chat template or plain)")
    p.add_argument("--system", help="system prompt for conversations that have none")
    p.add_argument("--max-length", type=int, default=2048, help="truncate sequences to this many tokens")
    p.add_argument("--regenerate", action="store_true",
                   help="replace assistant answers by the base model's greedy ones (several processes share "
                        "the records out)")
    p.add_argument("--regen-max-new-tokens", type=int,
                   help=f"with --regenerate: answer length (default {REGEN_DEFAULTS['regen_max_new_tokens']})")
    p.add_argument("--regen-batch-size", type=int,
                   help=f"with --regenerate: prompts per batch (default {REGEN_DEFAULTS['regen_batch_size']})")
    p.add_argument("--save-data", help="with --regenerate: write the regenerated training records to this jsonl")
    p.add_argument("--draft-vocab-size", type=int, default=32000, help="capped at the base vocabulary")
    p.add_argument("--intermediate-size", type=int, help="head MLP width (default: the base's)")
    d = TrainConfig()
    p.add_argument("--ttt-steps", type=int, default=d.ttt_steps, help="unroll steps of training-time test")
    p.add_argument("--step-weight", type=float, default=d.step_weight, help="loss weight of step s is this**s")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N optimizer steps")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="0: evaluate at the end only")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--export-dtype", default=d.export_dtype, choices=sorted(DTYPES))
    p.add_argument("--pytorch-bin", action="store_true", help="also write pytorch_model.bin")
    show_defaults(p)
    return p.parse_args(argv)


def load_base_config(path: str):
    """The base's config, read before its weights: a wrong path or a draft
    head given as the base is a clear error (the engine's check), and the
    head's shape is known for --resume's check."""
    from transformers import AutoConfig

    from ..loading import read_base_config
    from ..model_files import expand_path

    path = expand_path(path)
    read_base_config(path)
    return AutoConfig.from_pretrained(path)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from ..model_files import expand_path

    return AutoTokenizer.from_pretrained(expand_path(path))


def base_eos_ids(path: str, base_config) -> set[int]:
    """The eos ids the base stops at (Llama-3-Instruct's generation_config.json
    lists <|eot_id|> there), before its weights load."""
    from transformers import GenerationConfig

    from ..model_files import expand_path

    try:
        return eos_ids(GenerationConfig.from_pretrained(expand_path(path)))
    except OSError:  # no generation_config.json: transformers derives it from config.json
        return eos_ids(text_config(base_config))


def load_base(path: str):
    """The base model; the engine's loader gives a clear error for a wrong
    path or a draft head given as the base."""
    from ..loading import load_base as load_checked_base

    # As every command's --dtype auto loads it, so that the head learns the features the engine will give it.
    base = load_checked_base(path, dtype=pick_dtype("auto", torch.cuda.is_available(), path))
    if torch.cuda.is_available():
        from accelerate import PartialState

        base.to(PartialState().device)
    return base.eval()


def regenerate_shared(records: list[dict], base, tokenizer, args: argparse.Namespace) -> list[dict]:
    """`regenerate` with the records split over the processes: each answers
    its contiguous share, and every process gets all of them back in order.
    A record's answers depend on it alone (greedy, unpadded batches), so the
    answers are those of one process."""
    from accelerate.utils import gather_object

    with process_state().split_between_processes(records) as share:
        answered = regenerate(share, base, tokenizer, args.model_type, args.regen_max_new_tokens, args.system,
                              args.regen_batch_size)
    return gather_object(answered)


def check_options(args: argparse.Namespace) -> TrainConfig:
    """The options' values and the files the run writes, before anything loads
    (and the defaults of the --regen-* options, left None to see them given)."""
    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    check_head_sizes(args.draft_vocab_size, args.intermediate_size)
    for flag in ("max_length", "regen_max_new_tokens", "regen_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    given = [f"--{name.replace('_', '-')}" for name in (*REGEN_DEFAULTS, "save_data")
             if getattr(args, name) is not None]
    if given and not args.regenerate:  # they would be silently ignored
        raise ValueError(f"{', '.join(given)}: only with --regenerate (the base model's own answers); add "
                         f"--regenerate, or leave {'it' if len(given) == 1 else 'them'} out")
    for name, default in REGEN_DEFAULTS.items():  # (None: not given)
        if getattr(args, name) is None:
            setattr(args, name, default)
    previous_checkpoints(Path(args.out), args.resume, options=run_options(cfg, process_state().num_processes))
    if args.regenerate and args.save_data:
        check_writable(args.save_data, "--save-data")
    return cfg


def check_head(args: argparse.Namespace, base_config) -> None:
    """The head these options make for this base, before the base's weights
    load: its config must be valid, and --resume's checkpoints must hold a
    head of its shape. (A RoPE scaling it drops is a warning when training
    starts: warned here too, it would be warned twice.)"""
    config = head_config_for(base_config, args.draft_vocab_size, args.intermediate_size, warn=False)
    HeadConfig.from_dict(config, "eagle3")
    shape = head_options(base_config, args.draft_vocab_size, args.intermediate_size)
    previous_checkpoints(Path(args.out), args.resume, base_config, shape)


def read_data(paths: list[str] | None) -> tuple[list[dict], list[str]]:
    """The records of jsonl files, and the `file:line` of each."""
    numbered = [item for path in paths or () for item in read_numbered_records(path)]
    return [record for _, record in numbered], [name for name, _ in numbered]


def samples_for(args, records: list[dict], names: list[str], tokenizer, stop_ids: set[int],
                purpose: str = "training") -> list[Sample]:
    return to_samples(records, tokenizer, args.model_type, args.max_length, args.system, purpose, names, stop_ids)


def main(argv=None) -> None:
    args = parse_args(argv)
    with interrupted(PROG, Path(args.out), STARTED_OUTPUTS):
        run(args)
    if is_main_process():
        print(f"head written to {args.out}")


def run(args: argparse.Namespace) -> None:
    """The checks, the data, the base model and the training of `main`."""
    # Bad options, paths and data (a record the chat template refuses too) fail before the base model loads.
    with checks_said_once(PROG):
        cfg = check_options(args)
        base_config = load_base_config(args.base_model_path)
        check_head(args, base_config)
        tokenizer = load_tokenizer(args.base_model_path)
        stop_ids = base_eos_ids(args.base_model_path, base_config)
        records, names = read_data(args.data)
        eval_records, eval_names = read_data(args.eval_data)
        if args.regenerate:  # the answers are checked once the base model has written them
            check_prompts(records, tokenizer, args.model_type, args.system, names)
        else:
            samples = samples_for(args, records, names, tokenizer, stop_ids)
        eval_samples = samples_for(args, eval_records, eval_names, tokenizer, stop_ids, "evaluation") \
            if eval_records else None
        base = load_base(args.base_model_path)
    with errors_said_once(PROG):  # (said by one process, none left waiting for another)
        regenerated_from = None
        if args.regenerate:
            regenerated_from = records_fingerprint(records, args.model_type, args.system, args.regen_max_new_tokens)
            records = regenerate_shared(records, base, tokenizer, args)
            if args.save_data and is_main_process():  # (every process holds all of them)
                Path(args.save_data).write_text("".join(json.dumps(r) + "\n" for r in records))
            samples = samples_for(args, records, names, tokenizer, stop_ids)
        # (a resumed checkpoint past this run's steps is found once the step count is known)
        train(base, samples, args.out, cfg, args.draft_vocab_size, args.intermediate_size, eval_samples, args.resume,
              regenerated_from=regenerated_from)


if __name__ == "__main__":
    main()
