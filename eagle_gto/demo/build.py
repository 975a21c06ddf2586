"""Rebuild the whole demo pair from scratch, offline: the base model, then its EAGLE-3 head.

    python -m eagle_gto.demo.build [--seed S] [--base-steps N] [--head-steps N]

About half an hour on two CPU cores. Writes eagle_gto/demo/assets/base and
eagle_gto/demo/assets/eagle3 (a GTO head, assets/gto, is built on top of
the eagle3 head by GTO fine-tuning).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from ..cli_help import show_defaults
from . import ASSETS, build_head


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.demo.build",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-steps", type=int, help="optimizer steps of the base model (default: build_base's)")
    p.add_argument("--head-steps", type=int, help="optimizer steps of the head (default: build_head's)")
    args = show_defaults(p).parse_args(argv)
    for name in ("base_steps", "head_steps"):  # 0 would train nothing: refused, not read as "not given"
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # The base builder is a script with its own argument parser: run it as one.
    command = [sys.executable, "-m", "eagle_gto.demo.build_base", "--out", str(ASSETS / "base"),
               "--seed", str(args.seed)]
    if args.base_steps is not None:
        command += ["--steps", str(args.base_steps)]
    subprocess.run(command, check=True)
    head_args = ["--base", str(ASSETS / "base"), "--out", str(ASSETS / "eagle3"), "--seed", str(args.seed)]
    if args.head_steps is not None:
        head_args += ["--steps", str(args.head_steps)]
    build_head.main(head_args)


if __name__ == "__main__":
    main()
