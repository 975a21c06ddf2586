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
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..chat import MODEL_TYPES, eos_ids, model_type_arg
from ..checkpoint import save_head
from ..cli_help import show_defaults
from ..dtype_option import pick_dtype
from ..heads import Eagle3Head, HeadConfig
from ..jsonl import read_log
from .checkpoints import interrupted, read_progress
from .config import DTYPES, TrainConfig
from .data import Sample, check_prompts, collate, read_numbered_records, regenerate, to_samples, token_counts
from .errors import check_gradient_norm, checks_said_once, errors_said_once
from .features import target_outputs
from .head_init import attach_target_embedding, check_head_sizes, head_config_for, head_options, new_head, text_config
from .outputs import STARTED_OUTPUTS, check_writable
from .plot import plot_metrics
from .processes import is_main_process, process_state
from .resume import (base_name, check_same_data, data_fingerprint, precision, previous_checkpoints, records_fingerprint,
                     resume_warnings, resumed_index, run_options, save_checkpoint, saved_window)
from .schedule import MicroBatches, lr_at
from .ttt import TTTObjective

PROG = "python -m eagle_gto.train"
REGEN_DEFAULTS = {"regen_max_new_tokens": 512, "regen_batch_size": 16}  # (options of --regenerate only)


def run_batch(objective, base, samples: list[Sample], device):
    batch = {k: v.to(device) for k, v in collate(samples).items()}
    # The base runs as the engine runs it, in its own dtype: under the head's bf16 autocast a float16 base's
    # features would be bfloat16 ones, not those the head is given
    with torch.autocast(torch.device(device).type, enabled=False):
        target = target_outputs(base, batch["input_ids"], batch["attention_mask"])
    # The head trains in float32: a half-precision base's features are cast, as GTO casts them (on GPUs autocast
    # would reconcile the two; on the CPU nothing does)
    features = target.features.float()
    return objective(features, batch["input_ids"], target.logits, batch["loss_mask"], batch["attention_mask"])


@torch.no_grad()
def evaluate(objective, base, samples: list[Sample], batch_size: int, device) -> dict:
    """Mean loss and per-step accuracy over `samples` (weighted by positions)."""
    loss, correct, counts = 0.0, None, None
    batches = 0
    for start in range(0, len(samples), batch_size):
        out = run_batch(objective, base, samples[start : start + batch_size], device)
        hits = torch.tensor([a * c for a, c in zip(out.step_accuracy, out.step_counts)], dtype=torch.float64)
        seen = torch.tensor(out.step_counts, dtype=torch.float64)
        correct = hits if correct is None else correct + hits
        counts = seen if counts is None else counts + seen
        loss += float(out.loss)
        batches += 1
    return {"eval_loss": loss / max(batches, 1), "eval_acc": (correct / counts.clamp(min=1)).tolist()}


def train(base, samples: list[Sample], out: str | Path, cfg: TrainConfig, draft_vocab_size: int = 32000,
          intermediate_size: int | None = None, eval_samples: list[Sample] | None = None,
          resume: bool = False, show_progress: bool = True, regenerated_from: str | None = None) -> Eagle3Head:
    """Train a head for `base` (a transformers causal LM, already placed) on
    token samples; write checkpoints, metrics, the plot and the exported head
    into `out`; return the trained head (float32). `regenerated_from`: for
    samples of the base's own answers, the records_fingerprint of the records
    it answered."""
    from accelerate import Accelerator

    out = Path(out)
    if not samples:
        raise ValueError("no training samples (every record was empty or had no loss tokens)")
    shape = head_options(base.config, draft_vocab_size, intermediate_size)
    options, data = run_options(cfg, process_state().num_processes), data_fingerprint(samples)
    eval_data = data_fingerprint(eval_samples) if eval_samples else None
    previous = previous_checkpoints(out, resume, base.config, shape, options)
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if on_gpu else "no", cpu=not on_gpu)
    device = accelerator.device
    base.eval().requires_grad_(False)
    counts = token_counts(samples, base.config.get_text_config().vocab_size)  # multimodal configs nest it
    head = new_head(base, counts, draft_vocab_size, intermediate_size, cfg.seed)
    head.to(device)
    attach_target_embedding(head, base)
    objective = TTTObjective(head, cfg.ttt_steps, cfg.step_weight)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    objective, optimizer = accelerator.prepare(objective, optimizer)

    world = accelerator.num_processes
    batches = MicroBatches(len(samples), cfg.batch_size, world, accelerator.process_index, cfg.seed,
                           grad_accum=cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches.per_epoch / cfg.grad_accum))
    step = 0
    window: list[tuple[float, list[float], list[float], list[int]]] = []  # loss, step losses, hits, counts
    metrics_file = out / "metrics.jsonl"
    recorded = {"eval_data": eval_data, "base": base_name(base), "precision": precision(base, accelerator)}
    if previous:
        progress = read_progress(previous[-1], total)
        changed = [check_same_data(previous[-1], progress, data, regenerated_from),
                   *resume_warnings(previous[-1], progress, recorded)]
        for warning in filter(None, changed if accelerator.is_main_process else ()):
            warnings.warn(warning)
        index = resumed_index(progress, cfg.batch_size * world)
        accelerator.load_state(str(previous[-1]))
        step, batches.epoch, batches.index = progress["step"], progress["epoch"], index
        window = saved_window(previous[-1], accelerator.process_index, world)
        accelerator.print(f"resumed from {previous[-1]} (step {step})")
    elif resume:  # (a --resume that starts over says so)
        accelerator.print(f"{out} holds no complete checkpoint: starting from step 0")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # Metrics logged after the checkpoint are logged again by the resumed run.
        kept = [line for line, record in read_log(metrics_file) if record["step"] <= step] \
            if previous and metrics_file.exists() else []
        metrics_file.write_text("".join(line + "\n" for line in kept))

    started, tokens = time.time(), 0
    objective.train()
    # (closed on the way out too: a Ctrl-C's line then starts on a line of its own)
    with tqdm(total=total, initial=step, desc="train head", dynamic_ncols=True,
              disable=not (show_progress and accelerator.is_main_process)) as bar:
        while step < total:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            for micro in range(cfg.grad_accum):
                chunk = [samples[i] for i in batches.next()]
                tokens += sum(len(s.input_ids) for s in chunk)
                sync = accelerator.no_sync(objective) if micro < cfg.grad_accum - 1 else nullcontext()
                with sync, accelerator.autocast():
                    result = run_batch(objective, base, chunk, device)
                    accelerator.backward(result.loss / cfg.grad_accum)
                window.append((float(result.loss.detach()), [float(x.detach()) for x in result.step_losses],
                               [a * c for a, c in zip(result.step_accuracy, result.step_counts)], result.step_counts))
            # (an infinite bound clips nothing: max_grad_norm 0 turns clipping off, not the check)
            norm = accelerator.clip_grad_norm_(objective.parameters(), cfg.max_grad_norm or math.inf)
            check_gradient_norm(norm, step + 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            record = {}
            if step % cfg.log_every == 0 or step == total:
                record = _summarise(window, accelerator)
                record.update(step=step, epoch=round(batches.epoch + batches.index / batches.per_epoch, 3),
                              lr=lr_at(step - 1, total, cfg),
                              tokens_per_s=round(tokens * world / (time.time() - started), 1))
                window = []
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc0=f"{record['acc'][0]:.2f}")
            # The final evaluation comes before the last checkpoint: a resumed finished run does not log it again.
            if eval_samples and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
                record.update(step=step, **_evaluate_main(accelerator, objective, base, eval_samples, cfg, device))
            if record:
                _append(accelerator, metrics_file, record)
            if step % cfg.save_every == 0 or step == total:
                progress = {"step": step, "epoch": batches.epoch, "index": batches.index,
                            "micro_batch": cfg.batch_size * world, "head_options": shape, "options": options,
                            "data": data, "regenerated_from": regenerated_from, **recorded}
                save_checkpoint(accelerator, out, progress, cfg.keep_checkpoints, window)

    head = accelerator.unwrap_model(objective).head
    if accelerator.is_main_process:
        # A fresh module for the export: the training head holds the
        # target's embedding by reference, which a copy would duplicate.
        export = Eagle3Head(head.config)
        export.load_state_dict(head.state_dict())
        save_head(export.to(DTYPES[cfg.export_dtype]), out, pytorch_bin=cfg.pytorch_bin)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        try:
            plot_metrics(metrics_file, out / "training_curves.png")
        except ImportError:
            print("matplotlib is not installed (pip install eagle-gto[train]): no training_curves.png")
    accelerator.wait_for_everyone()
    return head


def _summarise(window, accelerator) -> dict:
    """Mean loss, per-step losses and position-weighted per-step accuracy
    over the micro-batches since the last log of all processes. Sums are
    reduced, not means: a resumed run's processes may hold unequal shares."""
    steps = len(window[0][1])

    def total(values) -> torch.Tensor:
        return accelerator.reduce(torch.tensor(values, device=accelerator.device, dtype=torch.float64), "sum")

    batches = total([len(window)])
    loss = total([sum(w[0] for w in window)]) / batches
    step_losses = total([sum(w[1][s] for w in window) for s in range(steps)]) / batches
    hits = total([sum(w[2][s] for w in window) for s in range(steps)])
    counts = total([sum(w[3][s] for w in window) for s in range(steps)])
    return {"loss": round(float(loss), 5), "step_loss": [round(float(x), 5) for x in step_losses],
            "acc": [round(float(x), 4) for x in hits / counts.clamp(min=1)]}


def _evaluate_main(accelerator, objective, base, eval_samples, cfg, device) -> dict:
    result = {}
    if accelerator.is_main_process:
        module = accelerator.unwrap_model(objective)
        module.eval()
        with accelerator.autocast():
            result = evaluate(module, base, eval_samples, cfg.batch_size, device)
        module.train()
        result = {"eval_loss": round(result["eval_loss"], 5), "eval_acc": [round(a, 4) for a in result["eval_acc"]]}
    accelerator.wait_for_everyone()
    return result


def _append(accelerator, file: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with file.open("a") as f:
            f.write(json.dumps(record) + "\n")


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

    from ..checkpoint import expand_path, read_base_config

    path = expand_path(path)
    read_base_config(path)
    return AutoConfig.from_pretrained(path)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from ..checkpoint import expand_path

    return AutoTokenizer.from_pretrained(expand_path(path))


def base_eos_ids(path: str, base_config) -> set[int]:
    """The eos ids the base stops at (Llama-3-Instruct's generation_config.json
    lists <|eot_id|> there), before its weights load."""
    from transformers import GenerationConfig

    from ..checkpoint import expand_path

    try:
        return eos_ids(GenerationConfig.from_pretrained(expand_path(path)))
    except OSError:  # no generation_config.json: transformers derives it from config.json
        return eos_ids(text_config(base_config))


def load_base(path: str):
    """The base model; the engine's loader gives a clear error for a wrong
    path or a draft head given as the base."""
    from ..checkpoint import load_base as load_checked_base

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

