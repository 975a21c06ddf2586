"""The EAGLE-3 training loop: per optimizer step the base model runs on the batch (features.py), the head is
unrolled `ttt_steps` times on its own outputs against the target's distribution (ttt.py), AdamW updates it with
gradient clipping under a warm-up + cosine learning rate (schedule.py). The command line: __main__.py."""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import save_head
from ..heads import Eagle3Head
from ..jsonl import read_log
from .checkpoints import read_progress
from .config import DTYPES, TrainConfig
from .data import Sample, collate, token_counts
from .errors import check_gradient_norm
from .features import target_outputs
from .head_init import attach_target_embedding, head_options, new_head
from .plot import plot_metrics
from .processes import process_state
from .resume import (base_name, check_same_data, data_fingerprint, precision, previous_checkpoints, resume_warnings,
                     resumed_index, run_options, save_checkpoint, saved_window)
from .schedule import MicroBatches, lr_at
from .ttt import TTTObjective


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
