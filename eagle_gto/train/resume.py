"""What an EAGLE-3 run's checkpoints record besides the weights (options, head shape, data, base, precision, data
position, the log window) and what a resumed run checks against it (checkpoints.py: the folders both trainers
share)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoints import (CheckpointMismatch, check_not_stopped, check_same_options, checkpoint_path,
                          checkpoints_to_resume, complete_checkpoint, writing_checkpoint)
from .config import TrainConfig
from .data import Sample
from .head_init import head_options
from .outputs import HEAD_FILES, STARTED_OUTPUTS, check_new_out


def resumed_index(progress: dict, micro_batch: int) -> int:
    """The checkpoint's position in its epoch in micro-batches of `micro_batch`
    sequences over all processes (--batch-size x processes). A run resumed with
    another split of the same global batch (one process with --grad-accum 2 for
    two) counts other micro-batches: the index is converted, else samples are
    skipped and repeated. (Checkpoints that do not record it: not converted.)"""
    then = progress.get("micro_batch", micro_batch)
    seen = progress["index"] * then
    if seen % micro_batch:
        raise CheckpointMismatch(f"the checkpoint is {seen} sequences into its epoch, not a whole number of this "
                                 f"run's micro-batches of {micro_batch} (--batch-size x processes): resume with "
                                 f"--batch-size x processes dividing {seen}, or as the run started ({then})")
    return seen // micro_batch


# The options a resumed run may change: its length, the split of its global batch (which is compared), how often
# it checkpoints, logs and evaluates, and its export.
RESULT_OPTIONS = ("ttt_steps", "step_weight", "lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "max_grad_norm",
                  "seed")
GLOBAL_BATCH = "batch-size x grad-accum x processes"


def run_options(cfg: TrainConfig, world: int) -> dict:
    """The options of `cfg` the run's result depends on, for `world` processes."""
    options = {name: getattr(cfg, name) for name in RESULT_OPTIONS}
    options[GLOBAL_BATCH] = cfg.batch_size * cfg.grad_accum * world
    return options


def previous_checkpoints(out: Path, resume: bool, base_config=None, shape: dict | None = None,
                         options: dict | None = None) -> list[Path]:
    """The checkpoints a run continues from. A fresh run refuses a folder
    that holds another run's checkpoints (it would rotate them away or,
    resumed later, continue from them) or exported head; a resumed one
    refuses checkpoints of a head of another `shape` (head_options for `base_config`)
    or of a run with other `options` (run_options)."""
    out = Path(out)
    previous = checkpoints_to_resume(out, resume)
    if not previous:
        check_new_out(out, HEAD_FILES)
        check_not_stopped(out, STARTED_OUTPUTS, resume)
    elif shape is not None:
        check_same_shape(previous[-1], base_config, shape)
    if previous and options is not None:
        then = json.loads((previous[-1] / "progress.json").read_text()).get("options")
        if then is not None:  # (None: written before checkpoints recorded them)
            check_same_options(previous[-1], then, options)
    return previous


def check_same_shape(checkpoint: Path, base_config, shape: dict) -> None:
    then = json.loads((checkpoint / "progress.json").read_text()).get("head_options")
    if then is None:  # written before checkpoints recorded it
        return
    # Checkpoints once recorded the options as typed (32000 for a draft vocabulary capped at 320).
    then = head_options(base_config, then.get("draft_vocab_size"), then.get("intermediate_size"))
    changed = [f"--{key.replace('_', '-')} {then.get(key)} then, {value} now"
               for key, value in shape.items() if then.get(key) != value]
    if changed:
        raise CheckpointMismatch(f"{checkpoint} holds a head of another shape ({'; '.join(changed)}): resume with "
                                 "the options that started the run, or choose another --out")


def data_fingerprint(samples: list[Sample]) -> str:
    """A digest of the training tokens and their loss masks, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.input_ids, sample.loss_mask]).encode())
    return digest.hexdigest()


def records_fingerprint(records: list[dict], model_type: str, system: str | None, max_new_tokens: int) -> str:
    """A digest of the records --regenerate answers anew, of how their prompts are written and of the answers'
    length bound (key order aside)."""
    described = json.dumps([records, model_type, system, max_new_tokens], sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()


def check_same_data(checkpoint: Path, progress: dict, data: str, regenerated_from: str | None = None) -> str | None:
    """Resumed on other tokens, a run would train on a mix, its data position counted in another data set:
    refused. But the base's greedy answers (--regenerate) to the same records may differ by a token on another GPU
    or number of processes (which batch other prompts together), which a resume may change: then a warning to
    say so is returned."""
    if progress.get("data", data) == data:  # (none: written before checkpoints recorded it)
        return None
    if regenerated_from is not None and progress.get("regenerated_from") == regenerated_from:
        return (f"the base's regenerated answers differ from those of the run that wrote {checkpoint} (another GPU "
                "or number of processes may change a token; or the base at --base-model-path changed): the resumed "
                "run trains on the new ones")
    raise CheckpointMismatch(f"{checkpoint} was written by a run on other data: the training tokens differ from "
                             "the run's (a --data file changed, or another --max-length, --model-type, --system or "
                             "tokenizer, or --regenerate given or left out): resume with the data that started the "
                             "run, or choose another --out")


def base_name(base) -> str:
    """The base model as it was loaded: a local folder resolved (given from another working folder, it is the same
    base), a hub id as written ("" for one built in memory)."""
    name = str(getattr(base.config, "_name_or_path", "") or "")
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def precision(base, accelerator) -> str:
    """How the base runs and the head trains: the base's dtype and the head's autocast (bf16 on a GPU)."""
    return f"base {str(base.dtype).removeprefix('torch.')}, head autocast {accelerator.mixed_precision}"


def resume_warnings(checkpoint: Path, progress: dict, now: dict) -> list[str]:
    """What a resume may change without a refusal, said (`now`: this run's eval_data, base and precision, as
    checkpoints record them; a checkpoint written before one was recorded says nothing of it):
    - other --eval-data (their data_fingerprint, None without): it changes what the run logs, not the head it
      trains, and a run may add --eval-data it was started without;
    - another base (its shape is compared by check_same_shape): the same model may have moved to another folder,
      but another model of the same shape would teach the head a mix of two bases' hidden states;
    - another precision (a run moved from a GPU to a CPU, or to a base saved in another dtype): there is no option
      to match the old one with, but the hidden states the head learns from change slightly."""
    then = {key: progress.get(key, value) for key, value in now.items()}
    said = []
    if then["eval_data"] != now["eval_data"]:
        said.append(f"--eval-data differs from that of the run that wrote {checkpoint} (other files or contents, or "
                    f"given or left out): the head trains as it would have; metrics.jsonl's evaluations up to step "
                    f"{progress['step']} are of the other set")
    if then["base"] != now["base"]:
        said.append(f"the base model {now['base']!r} is not the one of the run that wrote {checkpoint} "
                    f"({then['base']!r}): the head goes on learning from this base's hidden states; if it is another "
                    "model (not the same one moved), start a new run with another --out")
    if then["precision"] != now["precision"]:
        said.append(f"this run's precision ({now['precision']}) is not that of the run that wrote {checkpoint} "
                    f"({then['precision']}): training goes on, from hidden states computed in the new precision")
    return said


def window_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"log_window_{rank}.json"


def window_rank(file: Path) -> int:
    return int(file.stem.rsplit("_", 1)[1])


def saved_window(checkpoint: Path, rank: int, world: int) -> list:
    """This process's share of the micro-batch results the checkpoint's
    processes saved: all of them shared out when the resumed run has another
    number of processes (the log sums them over processes, whichever holds them)."""
    saved = sorted(checkpoint.glob("log_window_*.json"), key=window_rank)
    return [entry for file in saved if window_rank(file) % world == rank
            for entry in json.loads(file.read_text())]


def save_checkpoint(accelerator, out: Path, progress: dict, keep: int, window: list) -> None:
    """Weights, optimizer and data position; and each process's micro-batch
    results since the last log, so that a resumed run logs the same averages."""
    path = checkpoint_path(out, progress["step"])
    with writing_checkpoint(path):
        accelerator.save_state(str(path))
    path.mkdir(parents=True, exist_ok=True)
    window_file(path, accelerator.process_index).write_text(json.dumps(window) + "\n")
    accelerator.wait_for_everyone()  # progress.json marks a complete checkpoint
    if accelerator.is_main_process:
        # A write a kill cut short, of a run with more processes, left their windows here: from this checkpoint
        # a resumed run would log them again
        for stale in path.glob("log_window_*.json"):
            if window_rank(stale) >= accelerator.num_processes:
                stale.unlink()
        complete_checkpoint(out, path, progress, keep)
    accelerator.wait_for_everyone()
