"""Command-line help shared by the tools: every option's --help says its default."""

from __future__ import annotations

import argparse


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append "(default: X)" to the help of every option that has a default its help does not already state.

    Without it --help left out the defaults of options with a plain help (or none), which the README's tables
    then were the only place to find."""
    for action in parser._actions:  # (argparse has no public list of a parser's options)
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in (action.help or ""):  # (0 is a default to say: not `in (None, False)`)
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
    return parser
