"""The README names every option of every command-line tool, so that it stays the one place to read them."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# The README's command -> (module, function, argv) that builds and parses its options.
COMMANDS = {
    "python -m eagle_gto": ("eagle_gto.__main__", "parse_args", []),
    "python -m application.webui": ("application.webui", "main", []),
    "python -m application.api_server": ("application.api_server", "main", []),
    "python -m eagle_gto.train": ("eagle_gto.train.__main__", "parse_args", []),
    "python -m eagle_gto.gto": ("eagle_gto.gto.__main__", "main", []),
    "python -m eagle_gto.gto experiment": ("eagle_gto.gto.__main__", "main", ["experiment"]),
    "python -m eagle_gto.gto sweep": ("eagle_gto.gto.__main__", "main", ["sweep"]),
    "python -m eagle_gto.evaluation.gen_answer": ("eagle_gto.evaluation.gen_answer", "parse_args", []),
    "python -m eagle_gto.evaluation.speed": ("eagle_gto.evaluation.speed", "main", []),
    "python -m eagle_gto.demo.build": ("eagle_gto.demo.build", "main", []),
    "python -m eagle_gto.demo.build_base": ("eagle_gto.demo.build_base", "main", None),
    "python -m eagle_gto.demo.build_head": ("eagle_gto.demo.build_head", "parse_args", []),
    "python -m eagle_gto.demo.measure": ("eagle_gto.demo.measure", "main", []),
    "python -m eagle_gto.benchmarks.engine_overhead": ("eagle_gto.benchmarks.engine_overhead", "main", []),
    "python -m eagle_gto.benchmarks.op_count": ("eagle_gto.benchmarks.op_count", "main", []),
    "python -m eagle_gto.benchmarks.gpu_equality": ("eagle_gto.benchmarks.gpu_equality", "main", []),
    "python -m eagle_gto.benchmarks.reference_parity": ("eagle_gto.benchmarks.reference_parity", "parse_args", []),
    "python -m eagle_gto.benchmarks.reference_engine": ("eagle_gto.benchmarks.reference_engine", "main", []),
}


class Parsing(Exception):
    """Raised where the tool would parse its command line: the parser is all the test wants."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    module, function, argv = COMMANDS[command]

    def stop(parser, *args, **kwargs):
        raise Parsing(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr("sys.argv", [command])
    with pytest.raises(Parsing) as parsing:
        call = getattr(importlib.import_module(module), function)
        call() if argv is None else call(argv)
    parser = parsing.value.parser
    assert parser.prog == command  # the README's name for it is the one its --help shows
    return parser


def options_of(command: str, monkeypatch) -> list[str]:
    parser = parser_of(command, monkeypatch)
    return [name for action in parser._actions if action.help != argparse.SUPPRESS  # (internal: not in --help)
            for name in action.option_strings if name.startswith("--") and name != "--help"]


@pytest.mark.parametrize("command", COMMANDS)
def test_the_readme_names_every_option_of_each_command(command, monkeypatch):
    assert command in README
    options = options_of(command, monkeypatch)
    assert options
    missing = [name for name in options if not re.search(re.escape(name) + r"(?![\w-])", README)]
    assert not missing, f"{command}: options the README does not name: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_help_of_each_command_says_every_default(command, monkeypatch):
    """--help is the other place to read the options: one with a default says it there, as the README does."""
    parser = parser_of(command, monkeypatch)
    unstated = []
    for action in parser._actions:
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and action.help != argparse.SUPPRESS and not unset:
            formatter = parser._get_formatter()
            formatter.add_argument(action)
            if "default" not in formatter.format_help():
                unstated.append(action.option_strings[0])
    assert not unstated, f"{command}: options whose --help does not say their default: {unstated}"


def test_the_readme_names_checkpoint_folders_as_training_writes_them(tmp_path):
    """The README said `step-N`; the folders are zero-padded (step-00000002), which a user typing a path meets."""
    from eagle_gto.train.checkpoints import checkpoint_path

    named = set(re.findall(r"checkpoints/(step-[\w]+)", README))
    assert named == {"step-NNNNNNNN"}
    assert checkpoint_path(tmp_path, 2).name == "step-00000002"
    examples = re.findall(r"`(step-\d+)`", README)
    assert examples and all(checkpoint_path(tmp_path, int(name[5:])).name == name for name in examples)


def test_the_code_layout_names_every_module():
    """"Where the code is" lists every module by name (the demo's by its folder), so that a module added or renamed
    shows up there; and each name it gives is a module that exists."""
    root = Path(__file__).resolve().parents[1]
    section = README[README.index("### Where the code is"):README.index("## Tests")]
    named = {name.rstrip("/").split("/")[-1] for name in re.findall(r"`([\w/]+?)(?:\.py)?`", section)}
    modules = [p for p in [*root.glob("eagle_gto/**/*.py"), *root.glob("application/*.py")]
               if p.name != "__init__.py" and p.parent.name != "demo"]
    assert modules
    assert sorted(str(p.relative_to(root)) for p in modules if p.stem not in named) == []
    stems = {p.stem for p in modules} | {"demo", "train", "gto", "evaluation", "benchmarks", "eagle_gto"}
    assert sorted(named - stems - {"EaModel", "CheckpointError"}) == []
