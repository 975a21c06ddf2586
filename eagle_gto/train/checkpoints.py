"""Training checkpoints in OUT/checkpoints/step-NNNNNNNN (the step, zero-padded), shared by EAGLE-3 training
(eagle_gto.train) and GTO fine-tuning (eagle_gto.gto), so that both resume alike.

A checkpoint is complete once its progress.json is written (last, after every
other file, and whole or not at all): a run killed while it saved leaves a
folder without one, which is not resumed from (and is removed once another
checkpoint is complete). The newest `keep` complete checkpoints are kept.
Ctrl-C stops either trainer with one line saying how to go on (`interrupted`).
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ..files import sync_files, write_atomically
from .errors import main_process


class CheckpointMismatch(ValueError):
    """--out holds training checkpoints that do not belong to this run."""

    seen_by_all = True  # (every process reads the same checkpoints: rank 0 says it, errors_said_once)


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first."""
    root = Path(out) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "progress.json").is_file()) if root.is_dir() else []


def check_checkpointing(save_every: int, keep: int) -> None:
    """--save-every and --keep-checkpoints must be at least 1 (0 may be meant as "none": say what a run does
    instead)."""
    why = {"--save-every": "a --save-every past the run's steps checkpoints only the last step",
           "--keep-checkpoints": "the newest is the one --resume continues from"}
    for flag, value in (("--save-every", save_every), ("--keep-checkpoints", keep)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value} ({why[flag]})")


def check_same_options(checkpoint: Path, then: dict, now: dict) -> None:
    """A checkpoint continues only the run that wrote it: resumed with other options it would train a head that
    neither run's options describe."""
    changed = [f"--{name.replace('_', '-')} {then.get(name)} then, {now.get(name)} now"
               for name in dict.fromkeys([*then, *now]) if then.get(name) != now.get(name)]
    if changed:
        raise CheckpointMismatch(f"{checkpoint} was written by a run with other options ({'; '.join(changed)}): "
                                 "resume with the options that started the run, or choose another --out")


def check_not_stopped(out: Path, started: tuple[str, ...], resume: bool) -> None:
    """An `out` without complete checkpoints that holds what a run writes before its first (`started`): a run
    killed before it, or while it wrote it. A fresh run would write over it: refused, naming --resume."""
    found = [name for name in started if (Path(out) / name).exists()]
    if found and not resume:
        raise ValueError(f"{out} holds a run stopped before its first complete checkpoint ({', '.join(found)}): "
                         "pass --resume to start it again there from step 0, or choose another --out (or clear "
                         "this one)")


def checkpoint_path(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def checkpoints_to_resume(out: Path, resume: bool) -> list[Path]:
    """The checkpoints in `out`, which only --resume continues from: a fresh run
    would rotate them away or, resumed later, continue from another run's."""
    previous = checkpoint_dirs(out)
    if previous and not resume:
        raise CheckpointMismatch(f"{out} already holds checkpoints of an earlier run (up to {previous[-1].name}): "
                                 "pass --resume to continue it, or choose another --out (or clear this one)")
    return previous


@contextmanager
def writing_checkpoint(path: Path):
    """torch.save's failed write (a full disk) names neither the file nor the cause: say both."""
    try:
        yield
    except RuntimeError as err:
        raise OSError(f"{path}: the checkpoint could not be written (is the disk full?): {err}") from None


def read_progress(checkpoint: Path, steps: int) -> dict:
    """The checkpoint's progress.json; refused when it is past this run's `steps` (another run's: its head
    would be exported untrained)."""
    progress = json.loads((checkpoint / "progress.json").read_text())
    if progress["step"] > steps:
        raise CheckpointMismatch(f"{checkpoint} is at step {progress['step']}, past this run's {steps} steps: "
                                 "resume with the options of the run that wrote it, or choose another --out")
    return progress


def complete_checkpoint(out: Path, checkpoint: Path, progress: dict, keep: int) -> None:
    """Mark `checkpoint` complete (its other files are written) and remove all but the newest `keep`, and every
    incomplete one (a write a kill cut short, which a resumed run may never write again: its --save-every may
    differ; it may be as large as a complete one)."""
    # Whole or not at all: a run killed while it wrote progress.json left an empty or half file, which marked
    # the checkpoint complete and stopped every --resume with a JSON error. The weights go to the disk first: a
    # crash of the machine could otherwise leave a checkpoint marked complete whose weights were never written.
    sync_files(checkpoint)
    write_atomically(checkpoint / "progress.json", json.dumps(progress) + "\n")
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)
    for cut_short in checkpoint.parent.glob("step-*"):  # (one process writes checkpoints, one at a time)
        if not (cut_short / "progress.json").is_file():
            shutil.rmtree(cut_short)


@contextmanager
def interrupted(prog: str, out: Path, started: tuple[str, ...]):
    """Ctrl-C (a scheduler's SIGINT) stops a run as the user meant: one line saying how to go on (said by rank
    0 under several processes), instead of a traceback, and exit status 130. `started`: the files in `out` a
    run writes before its first checkpoint."""
    try:
        yield
    except KeyboardInterrupt:
        if main_process():
            print(f"{prog}: interrupted; {how_to_go_on(Path(out), started)}", file=sys.stderr)
        raise SystemExit(130) from None


def how_to_go_on(out: Path, started: tuple[str, ...]) -> str:
    saved = checkpoint_dirs(out)
    if saved:
        return f"run the same command with --resume to continue from {saved[-1]}"
    if any((out / name).exists() for name in started):
        return (f"{out} holds no complete checkpoint yet: run the same command with --resume to start again there "
                "from step 0")
    return f"nothing was written to {out}"
