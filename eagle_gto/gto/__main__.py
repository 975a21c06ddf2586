"""python -m eagle_gto.gto [options]: GTO fine-tuning of an EAGLE-3 head.

    python -m eagle_gto.gto --out runs/gto                      # the demo pair
    python -m eagle_gto.gto --base BASE --head HEAD --data train.jsonl --out runs/gto
    python -m eagle_gto.gto --out runs/gto --resume               # continue from its newest checkpoint
    torchrun --nproc_per_node 2 -m eagle_gto.gto --out runs/gto  # data-parallel: --windows per process
    python -m eagle_gto.gto experiment --out runs/gto-experiment  # GTO vs control and ablations
    python -m eagle_gto.gto sweep --grid lr=1e-4,3e-4 omega=1,4     # choose defaults on the validation slice

Every option and its default: `python -m eagle_gto.gto --help` (one source:
`GTOConfig` in trainer.py; the checkpoint options, which `experiment` and
`sweep` refuse: `checkpoint_options`). Checkpoints go to OUT/checkpoints every
--save-every steps and at the last: `--resume` continues from the newest, as
`python -m eagle_gto.train` does (checkpoints.py says what they hold).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch

from ..train.checkpoints import interrupted
from ..train.errors import checks_said_once, errors_said_once, main_process, one_line_errors
from .checkpoints import Checkpointing
from .parallel import launched_processes
from .trainer import STARTED_OUTPUTS, GTOConfig, check_data, check_out, load_models, load_streams, train

PROG = "python -m eagle_gto.gto"


def config_parser(description: str, command: str = "", fixed: dict[str, str] | None = None,
                  out_help: str | None = None) -> argparse.ArgumentParser:
    """The CLI of every GTOConfig field; `fixed` ({option: why}) names options the command sets itself:
    giving one is an error (it would be silently overridden, or worse, change what a result is labelled).
    `out_help`: what the command writes in --out, where that is not one run's files."""
    parser = argparse.ArgumentParser(prog=f"python -m eagle_gto.gto{command}", description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fixed = fixed or {}
    for f in dataclasses.fields(GTOConfig):
        flag = "--" + f.name.replace("_", "-")
        help = out_help if f.name == "out" and out_help else f.metadata["help"]
        boolean = f.type in (bool, "bool")
        if f.name in fixed:
            flags = (flag, "--no-" + flag[2:]) if boolean else (flag,)
            parser.add_argument(*flags, action=Refused, reason=fixed[f.name], nargs="?", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
            continue
        if boolean:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, type=f.metadata.get("type", kind), default=f.default,
                            choices=f.metadata.get("choices"), help=help)
    parser.add_argument("--threads", type=thread_count, help="torch CPU threads, at least 1 (1 is fastest on a busy "
                        "shared CPU); none: torch's default")
    return parser


def checkpoint_options(parser: argparse.ArgumentParser, refused: str | None = None) -> None:
    """--save-every, --keep-checkpoints and --resume (not GTOConfig fields: they do not change what a run trains);
    `refused`: why a command that keeps no checkpoints refuses them."""
    d = Checkpointing()
    options = {"--save-every": dict(type=int, default=d.save_every, help="checkpoint every N steps (and at the last)"),
               "--keep-checkpoints": dict(type=int, default=d.keep, help="how many of the newest checkpoints to keep"),
               "--resume": dict(action="store_true", help="continue from the newest checkpoint in --out")}
    for flag, settings in options.items():
        if refused:
            parser.add_argument(flag, action=Refused, reason=refused, nargs="?", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, **settings)


class Refused(argparse.Action):
    """An option the command fixes itself: a usage error that says why."""

    def __init__(self, option_strings, dest, reason: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.reason}")


def thread_count(text: str) -> int:
    """--threads: torch.set_num_threads refuses 0 and below only with a RuntimeError traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def config_from(args: argparse.Namespace) -> GTOConfig:
    """The GTOConfig part of parsed arguments (a fixed option keeps its default); applies --threads."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return GTOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GTOConfig) if hasattr(args, f.name)})


def input_errors(command: str = ""):
    """Bad options, paths or data: a one-line message instead of a traceback."""
    return one_line_errors(f"{PROG}{command}")


@contextmanager
def said_once():
    """Under several processes each meets the same bad option or data and says the same warnings: rank 0 says
    them; the others say nothing and leave with status 0 (a failed one would make the launcher stop rank 0,
    perhaps before it says why; the launch still fails by rank 0)."""
    if main_process():
        yield
        return
    try:
        with redirect_stderr(io.StringIO()):
            yield
    except SystemExit:
        raise SystemExit(0) from None


def check_one_process(command: str) -> None:
    """`experiment` and `sweep` run in one process: under torchrun or `accelerate launch` every process ran
    every training and evaluation and wrote the same files. Refused before anything loads (said once)."""
    world = launched_processes()
    if world > 1:
        raise ValueError(f"{world} processes (WORLD_SIZE): `{command}` runs in one process (each would run the "
                         "whole job and write the same files); run it without torchrun / accelerate launch (plain "
                         "fine-tuning, `python -m eagle_gto.gto [options]`, runs in several)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["experiment"], ["sweep"]):
        with said_once(), input_errors(f" {argv[0]}"):
            check_one_process(argv[0])
        from . import experiment, sweep

        return (experiment if argv[0] == "experiment" else sweep).main(argv[1:])
    parser = config_parser("GTO fine-tuning of an EAGLE-3 draft head (Phase II).")
    checkpoint_options(parser)
    parser.usage = "%(prog)s [experiment | sweep] [options]"
    parser.epilog = ("Two more commands, each with its own --help: `experiment` runs GTO against continued EAGLE-3 "
                     "training (and ablations) and compares their acceptance; `sweep` trains over a grid of settings "
                     "and ranks them on the validation slice.")
    with said_once():
        args = parser.parse_args(argv)  # (the same arguments: the same error in every process)
    with interrupted(PROG, Path(args.out), STARTED_OUTPUTS):
        # The processes compare the checks' outcomes: one that fails in one process alone (a file missing on one
        # node) stops them all, instead of that one leaving quietly while the others wait for it.
        with said_once(), checks_said_once(PROG):
            cfg = config_from(args)
            checkpointing = Checkpointing(args.save_every, args.keep_checkpoints, args.resume)
            check_out(cfg, checkpointing, launched_processes())  # a second run would overwrite the first
            check_data(cfg)  # before the models load
            models = load_models(cfg)
            streams = load_streams(cfg, models)
        # Not said_once: an error of one process alone must reach the user, and the others must not wait for it.
        with errors_said_once(PROG):
            summary = train(cfg, models, streams, checkpointing=checkpointing)  # (a diverged run: one line too)
    if main_process():
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
