"""Checkpoints of GTO fine-tuning, in OUT/checkpoints/step-NNNNNNNN as eagle_gto.train
writes its own (the folders, their completion and rotation, the refusals:
eagle_gto.train.checkpoints). Each holds what a resumed run needs to go on as
the uninterrupted run would have:
- state.pt: the trained head's weights (not the target's embedding, which it
  holds by reference), AdamW's state, the states of the seeded generators
  that draw the windows and the groups (and torch's global one), the records
  logged so far (metrics.jsonl and summary.json are written from them), the
  count of steps without groups and the training time so far;
- progress.json, written last: the step, the options the result depends on,
  which a resumed run must share (`check_same_run_options`), and a fingerprint of
  the training and validation tokens (and of the prompts of generated ones),
  which it must share too (`check_same_data`).
Every process holds the same head, optimizer and generators (each draws the
whole global batch): rank 0 writes them and every process reads them.
(There is no learning-rate schedule to save: GTO's rate is constant.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..train.checkpoints import (CheckpointMismatch, check_checkpointing, check_same_options, checkpoint_path,
                                 complete_checkpoint, writing_checkpoint)
from .data import TokenStream

# The options a resumed run may change: where it writes and runs, how long, the memory bound of the
# verification, how often it validates and the exported dtype. --windows is compared as the global batch
# (--windows x processes): a run may resume with another number of processes.
FREE_OPTIONS = ("out", "device", "steps", "tree_chunk", "eval_every", "export_dtype", "windows")
GLOBAL_WINDOWS = "windows x processes"
PATH_OPTIONS = ("base", "head", "reference", "data")  # a local folder or file, or a hub id (base, heads)
DATA_KINDS = ("generated", "stdlib")  # --data that names no file


@dataclass(frozen=True)
class Checkpointing:
    """--save-every, --keep-checkpoints and --resume of `python -m eagle_gto.gto`."""

    save_every: int = 100
    keep: int = 2
    resume: bool = False

    def __post_init__(self):
        check_checkpointing(self.save_every, self.keep)

    def due(self, step: int, steps: int) -> bool:
        """A checkpoint every `save_every` steps and at the last one (a run stopped while it exported resumes)."""
        return step % self.save_every == 0 or step == steps


def run_options(cfg, world: int) -> dict:
    """The options of `cfg` (a GTOConfig) that the run's result depends on, for `world` processes."""
    options = {name: value for name, value in cfg.recorded_options().items() if name not in FREE_OPTIONS}
    options[GLOBAL_WINDOWS] = cfg.windows * world
    return same_places(options)


def same_places(options: dict) -> dict:
    """`options` with each local path resolved (hub ids and --data kinds as given): ./head, head and its absolute
    path name one folder, and a run resumed from another working folder names it alike."""
    def place(value):
        if value is None or value in DATA_KINDS or not Path(value).exists():
            return value
        return str(Path(value).resolve())

    return {name: place(value) if name in PATH_OPTIONS else value for name, value in options.items()}


def defaults_named(options: dict) -> dict:
    """`options` with a --base or --head left out as the folder load_models reads (the demo base, its EAGLE-3
    head), and a --reference given as the head as one left out (a copy of the head): a run started with a
    default and resumed with that folder given, or the reverse, is the same run. Only compared, not recorded: a
    checkpoint names a default as None, so that it still resumes once the demo's folder has moved (a reinstall)."""
    named = dict(options)
    if any(name in named and named[name] is None for name in ("base", "head")):
        from ..demo import demo_paths

        base, head = demo_paths(head="eagle3")
        demo = same_places({"base": base, "head": head})
        named.update({name: demo[name] for name in demo if name in named and named[name] is None})
    if "reference" in named and named["reference"] == named.get("head"):  # (as None: another head is said once)
        named["reference"] = None
    return named


def check_same_run_options(checkpoint: Path, then: dict, now: dict) -> None:
    """`check_same_options` with paths compared as the folders they name (`same_places`: the paths of a
    checkpoint written before they were resolved are resolved from here) and defaults as the folders they stand
    for (`defaults_named`)."""
    check_same_options(checkpoint, defaults_named(same_places(then)), defaults_named(same_places(now)))


@dataclass(frozen=True)
class DataFingerprint:
    """Digests of the tokens a run trains and validates on (`tokens`) and, for --data generated, of the prompts
    the base continued (`prompts`)."""

    tokens: str
    prompts: str | None = None


def data_fingerprint(*streams: TokenStream) -> DataFingerprint:
    """The same --data may name other tokens on a resume (a jsonl file edited, or another one at the same
    relative path; another tokenizer; for --data generated, another corpus or base)."""
    digest = hashlib.sha256()
    for stream in streams:
        for tensor in (stream.ids, stream.loss_mask, stream.starts):
            digest.update(b"-" if tensor is None else tensor.cpu().numpy().tobytes())
    prompts = [stream.prompts for stream in streams]
    return DataFingerprint(digest.hexdigest(), None if None in prompts else "-".join(prompts))


def check_same_data(checkpoint: Path, now: DataFingerprint, generated: bool) -> str | None:
    """Resumed on other tokens, a run would train on a mix and compare validation tau on two validation sets:
    refused. But the base's greedy continuations (--data generated) of the same prompts may differ by a token
    on another --device or GPU, which a resume may change: then a warning to say (which also tells of another
    base at the same path) is returned."""
    progress = json.loads((checkpoint / "progress.json").read_text())
    then = DataFingerprint(progress.get("data"), progress.get("prompts"))
    if then.tokens is None or then == now:  # (None: written before checkpoints recorded it)
        return None
    if generated and then.prompts == now.prompts:
        return (f"the base's continuations (--data generated) differ from those of the run that wrote {checkpoint} "
                "(another --device or GPU may change a token; or the base at --base changed): the resumed run "
                "trains and validates on the new ones")
    what = ("the prompts of --data generated differ from the run's (the demo corpus, from Python's standard "
            "library, changed with another Python; or another tokenizer)" if generated else
            "the tokens of --data (or of its validation part) differ from the run's (the file changed, or its "
            "path names another file here; or another tokenizer)")
    raise CheckpointMismatch(f"{checkpoint} was written by a run on other data: {what}: resume with the data that "
                             "started the run, or choose another --out")


def trained_weights(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value for name, value in head.state_dict().items() if not name.startswith("embed_tokens.")}


def save_checkpoint(out: Path, step: int, keep: int, options: dict, data: DataFingerprint, head: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], log: dict) -> None:
    """Write the checkpoint of `step` (rank 0 alone), then keep the newest `keep`."""
    path = checkpoint_path(out, step)
    path.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with writing_checkpoint(path):
        torch.save({"head": trained_weights(head), "optimizer": optimizer.state_dict(),
                    "generators": {name: g.get_state() for name, g in generators.items()}, "rng": rng, "log": log},
                   path / "state.pt")
    progress = {"step": step, "options": options, "data": data.tokens, "prompts": data.prompts}
    complete_checkpoint(out, path, progress, keep)


def load_checkpoint(checkpoint: Path, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator]) -> dict:
    """Restore the head, the optimizer and the generators from `checkpoint`; return its log."""
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    own = trained_weights(head)
    saved = state["head"]
    changed = [f"{name} {list(saved[name].shape) if name in saved else 'absent'} then, "
               f"{list(own[name].shape) if name in own else 'absent'} now"
               for name in dict.fromkeys([*saved, *own])
               if name not in saved or name not in own or saved[name].shape != own[name].shape]
    if changed:
        raise CheckpointMismatch(f"{checkpoint} holds a head of another shape than the one fine-tuned now "
                                 f"({'; '.join(changed)}): resume with the --head that started the run, or choose "
                                 "another --out")
    head.load_state_dict(saved, strict=False)  # (all but the target's embedding, checked above)
    optimizer.load_state_dict(state["optimizer"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["log"]
