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
import hashlib
import json
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..chat import MODEL_TYPES, eos_ids, model_type_arg
from ..checkpoint import save_head
from ..cli_help import show_defaults
from ..dtype_option import pick_dtype
from ..heads import ROPE_TYPES, Eagle3Head, HeadConfig, rope_type
from ..jsonl import read_log
from ..vocab import build_vocab_mapping
from .checkpoints import (CheckpointMismatch, check_checkpointing, check_not_stopped, check_same_options,
                          checkpoint_path, checkpoints_to_resume, complete_checkpoint, interrupted, read_progress,
                          writing_checkpoint)
from .data import Sample, check_prompts, collate, read_numbered_records, regenerate, to_samples, token_counts
from .errors import errors_said_once
from .features import target_outputs
from .plot import plot_metrics
from .ttt import TTTObjective

PROG = "python -m eagle_gto.train"
REGEN_DEFAULTS = {"regen_max_new_tokens": 512, "regen_batch_size": 16}  # (options of --regenerate only)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # (GTO's too)


# The checks TrainConfig and GTOConfig share, one message for both.
def check_not_negative(cfg, *names: str) -> None:
    """The options `names` of `cfg` must be >= 0 (nan too is refused)."""
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def check_choice(name: str, value, choices) -> None:
    """argparse checks choices; a config built in code (or a sweep point) does not."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class TrainConfig:
    ttt_steps: int = 7
    step_weight: float = 0.8
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # sequences per process per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.5  # 0: no clipping (as in HF Trainer)
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    export_dtype: str = "bfloat16"
    pytorch_bin: bool = False

    def __post_init__(self) -> None:
        for name in ("ttt_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_checkpointing(self.save_every, self.keep_checkpoints)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0 < self.epochs < math.inf:  # (inf or nan: no step count, an error only once the base has loaded)
            raise ValueError(f"epochs must be a finite number above 0, got {self.epochs}")
        if not self.lr > 0:  # (a zero rate trains nothing, a negative one climbs the loss)
            raise ValueError(f"lr must be above 0, got {self.lr}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        check_not_negative(self, "step_weight")  # (a negative weight would train against the later steps' losses)
        check_not_negative(self, "weight_decay")  # (AdamW refuses it only once the base model has loaded)
        check_choice("export_dtype", self.export_dtype, tuple(DTYPES))  # (else a KeyError after training)
        for name in ("min_lr_ratio", "warmup_ratio"):  # fractions of lr and of the steps (below 0: a negative lr)
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- head
def text_config(base_config):
    return base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config  # multimodal


def head_options(base_config, draft_vocab_size: int, intermediate_size: int | None) -> dict:
    """The options that shape the head, resolved against the base as the
    head is made (the draft vocabulary capped at the base's, the base's MLP
    width by default): a checkpoint only loads into a head made with the
    same. Resolving is idempotent, so resolved values resolve to themselves."""
    text = text_config(base_config)
    if intermediate_size is None:
        intermediate_size = getattr(text, "intermediate_size", None)
        if not isinstance(intermediate_size, int):
            raise ValueError("the base's config has no intermediate_size to copy: give the head's MLP width "
                             "with --intermediate-size")
    return {"draft_vocab_size": min(draft_vocab_size, text.vocab_size), "intermediate_size": intermediate_size}


def head_rope(text, warn: bool = True) -> tuple[float, dict | None]:
    """The base's RoPE theta and, when the head implements its scaling, the
    scaling. Another scaling (yarn, dynamic, longrope) is dropped with a
    warning: the head gets default RoPE. It is trained and run with the
    RoPE of its own config.json (which the engine loads back), so it need
    not be the base's; what is lost is the scaling's long-context reach."""
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if all(isinstance(value, dict) for value in rope.values()):  # one per attention kind (Gemma-3)
        rope = rope.get("full_attention") or next(iter(rope.values()), {})
    theta = float(rope.get("rope_theta", getattr(text, "rope_theta", None)) or 10000.0)
    kind = rope_type(rope)
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        if warn:
            warnings.warn(f"the draft head does not implement the base's {kind!r} RoPE scaling (supported: "
                          f"{', '.join(ROPE_TYPES)}): the head uses default RoPE with theta {theta:g}, without "
                          f"the base's scaling {rope}")
        return theta, None
    return theta, dict(rope)


def head_config_for(base_config, draft_vocab_size: int, intermediate_size: int | None = None,
                    warn: bool = True) -> dict:
    """config.json of an EAGLE-3 head for this base: the base's width, heads,
    head width and RoPE, one layer, a draft vocabulary of `draft_vocab_size`
    (`warn`: about a RoPE scaling it drops)."""
    text = text_config(base_config)
    theta, scaling = head_rope(text, warn)
    cfg = dict(
        architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=text.hidden_size,
        **head_options(base_config, draft_vocab_size, intermediate_size),
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        num_hidden_layers=1, vocab_size=text.vocab_size, rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        hidden_act="silu", rope_theta=theta,
        max_position_embeddings=getattr(text, "max_position_embeddings", 2048), tie_word_embeddings=False,
    )
    if isinstance(getattr(text, "head_dim", None), int):  # not always hidden / heads (Gemma: 256, gpt-oss: 64)
        cfg["head_dim"] = text.head_dim
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def check_head_sizes(draft_vocab_size: int, intermediate_size: int | None) -> None:
    if draft_vocab_size < 1:
        raise ValueError(f"--draft-vocab-size must be at least 1, got {draft_vocab_size}")
    if intermediate_size is not None and intermediate_size < 1:
        raise ValueError(f"--intermediate-size must be at least 1, got {intermediate_size}")


def new_head(base, counts: torch.Tensor, draft_vocab_size: int, intermediate_size: int | None = None,
             seed: int = 0) -> Eagle3Head:
    """A fresh head whose draft vocabulary is the most frequent tokens of
    `counts`. Its norm and lm_head start as the target's final norm (norm_scale)
    and the target's lm_head rows of the draft vocabulary: the head's output
    lives in the target's hidden space, so that is a far better start than noise."""
    check_head_sizes(draft_vocab_size, intermediate_size)
    cfg = HeadConfig.from_dict(head_config_for(base.config, draft_vocab_size, intermediate_size), "eagle3")
    torch.manual_seed(seed)
    head = Eagle3Head(cfg)
    d2t, t2d = build_vocab_mapping(counts, cfg.draft_vocab_size)
    with torch.no_grad():
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
        head.lm_head.weight.copy_(base.get_output_embeddings().weight[t2d.to(base.device)].float())
        scale = norm_scale(getattr(base.get_decoder(), "norm", None), head.norm)
        if scale is not None:
            head.norm.weight.copy_(scale)
    return head


@torch.no_grad()
def norm_scale(norm, head_norm) -> torch.Tensor | None:
    """The head norm's weight that gives the base's final norm's output, or
    None when that norm is no RMSNorm of the head's width. Read from what the
    norm does, not from its weight: Gemma's RMSNorm scales by (1 + weight)."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.shape != head_norm.weight.shape:
        return None
    ones = torch.ones(weight.shape, device=weight.device)
    unit = torch.nn.functional.rms_norm(ones, ones.shape, eps=head_norm.eps)
    scale = norm(ones).float() / unit
    probe = torch.linspace(-2.0, 3.0, weight.numel(), device=weight.device)  # (LayerNorm would not fit)
    expected = scale * torch.nn.functional.rms_norm(probe, probe.shape, eps=head_norm.eps)
    if not torch.allclose(norm(probe).float(), expected, rtol=1e-2, atol=1e-3 * float(scale.abs().max())):
        return None
    return scale.cpu()


def attach_target_embedding(head: Eagle3Head, base) -> None:
    weight = base.get_input_embeddings().weight.detach()
    device = head.fc.weight.device
    head.attach_embedding(weight if weight.device == device else weight.to(device))


# ------------------------------------------------------------------------ schedule
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    warmup = max(1, round(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class MicroBatches:
    """Micro-batches of sample indices for one process, epoch after epoch,
    each epoch in its own seeded order; (epoch, index) is all a resume needs
    (index in micro-batches over all processes: resumed_index converts it to another split).
    An epoch is a whole number of global batches (x `grad_accum`): every split
    of one global batch ends its epochs at the same sample."""

    def __init__(self, count: int, batch_size: int, world: int, rank: int, seed: int, epoch: int = 0, index: int = 0,
                 grad_accum: int = 1):
        self.count, self.batch_size, self.world, self.rank, self.seed = count, batch_size, world, rank, seed
        self.epoch, self.index = epoch, index
        self.per_epoch = max(1, count // (batch_size * world * grad_accum)) * grad_accum

    def next(self) -> list[int]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        size = self.batch_size * self.world
        order = order.repeat(math.ceil(self.per_epoch * size / self.count))  # a data set smaller than one epoch
        start = self.index * size + self.rank * self.batch_size
        self.index += 1
        return order[start : start + self.batch_size].tolist()


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


# ------------------------------------------------------------------ output folder
HEAD_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")  # what save_head writes
STARTED_OUTPUTS = ("metrics.jsonl", "checkpoints")  # what a run writes before its first complete checkpoint


def check_new_out(out: str | Path, outputs: tuple[str, ...] = ()) -> None:
    """--out must be a folder (or not exist yet) that holds none of a
    finished run's `outputs`: a new run would overwrite them."""
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out}: {folder} is a file, not a folder")
            break
    found = [name for name in outputs if (out / name).exists()]
    if found:
        raise ValueError(f"{out} already holds the output of an earlier run ({', '.join(found)}): "
                         "choose another --out (or clear this one)")


def check_writable(path: str | Path, option: str) -> None:
    """A file written at the end of a long run is checked at its start."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: a folder, not a file")
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: there is no folder {path.parent}")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ValueError(f"{option} {path}: not writable")


@contextmanager
def one_line_errors(prog: str):
    """Bad options, paths or data: `prog: message` and exit status 1 instead of a traceback."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise SystemExit(f"{prog}: {err}") from None


@contextmanager
def checks_said_once(prog: str):
    """`one_line_errors` for the checks every process makes alike before training (nothing inside may wait for
    the other processes). Under several processes they then compare: rank 0 says the failure (that of the lowest
    rank with one) and every process stops, none left waiting for one that stopped; the others say nothing and
    leave with status 0 (a failed one would make the launcher stop rank 0 before it says why)."""
    state = process_state()
    failure = None
    try:
        yield
    except (OSError, ValueError) as err:
        failure = f"{prog}: {err}"
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        failure = next((f for f in gather_object([failure]) if f), None)
    if failure:
        raise SystemExit(failure if state.is_main_process else 0)


# -------------------------------------------------------------------- checkpoints
class TrainingDiverged(ValueError):
    """A step's gradients hold NaN or infinity."""

    seen_by_all = True  # (the norm of the reduced gradients: every process stops at the same step)


def check_gradient_norm(norm: torch.Tensor | float, step: int) -> None:
    """Stop before a step with NaN or infinite gradients updates the head: the
    run would go on for hours and export weights whose drafts are never
    accepted. (Under DDP the norm is taken of the reduced gradients, so every
    process stops at the same step.)"""
    value = float(norm)
    if not math.isfinite(value):
        raise TrainingDiverged(f"step {step}: the gradient norm is {value}: training diverged (or a batch's loss is "
                               "not a number); the head was not updated with it. Lower --lr and start again")


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


# --------------------------------------------------------------------------- train
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


# ----------------------------------------------------------------------------- CLI
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


def process_state():
    """The processes `accelerate launch` (or torchrun) started; the state train's Accelerator takes up."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """Under `accelerate launch` every process runs main(): what is written or
    said once, the main process does."""
    return process_state().is_main_process


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
