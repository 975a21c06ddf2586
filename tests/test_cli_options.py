"""Options every command that loads a model shares, with one meaning: `--dtype auto` (eagle_gto.dtype_option), and
the base's device map as `--device` or `--device-map`."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

import eagle_gto.__main__ as cli
from application import server_options as servers
from eagle_gto import EaModel
from eagle_gto.cli_help import show_defaults
from eagle_gto.dtype_option import auto_dtype, pick_dtype, saved_dtype
from eagle_gto.evaluation import gen_answer


@pytest.mark.parametrize("on_gpu,saved,bf16,expected", [
    (False, "bfloat16", True, "float32"),  # a CPU: half precision is slow there
    (True, "bfloat16", True, "bfloat16"),  # a GPU: the checkpoint's own half type (Llama-3, Qwen)
    (True, "float16", True, "float16"),  # (Vicuna, the demo)
    (True, "float32", True, "bfloat16"),  # a float32 checkpoint, or none said: half precision still
    (True, None, True, "bfloat16"),
    (True, None, False, "float16"),  # a GPU without bfloat16
    (True, "bfloat16", False, "bfloat16"),  # (the checkpoint's own still: its weights may not fit float16)
])
def test_auto_is_float32_on_a_cpu_and_the_checkpoints_half_type_on_a_gpu(monkeypatch, on_gpu, saved, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert auto_dtype(on_gpu, saved) == expected


def test_the_saved_dtype_is_read_as_transformers_4_and_5_write_it(tmp_path):
    assert saved_dtype(None) == "float16"  # the demo base
    for config, expected in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"),
                             ({"text_config": {"dtype": "bfloat16"}}, "bfloat16"), ({}, None),
                             ({"text_config": None}, None), ({"text_config": "llama"}, None)):  # (not ours to refuse)
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert saved_dtype(str(tmp_path)) == expected
    assert pick_dtype("float16", True, str(tmp_path)) == torch.float16  # a name given is kept


def dtype_loaded_by(command: str, base: str | None, monkeypatch, gpu: bool = True) -> torch.dtype:
    """The dtype `command` passes to EaModel.from_pretrained for --dtype auto, on a (pretended) GPU or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    loaded = {}

    def fake_from_pretrained(base_model_path, ea_model_path, **kwargs):
        loaded.update(kwargs)
        return SimpleNamespace(tokenizer=object())

    monkeypatch.setattr(EaModel, "from_pretrained", fake_from_pretrained)
    paths = [] if base is None else ["--base-model-path", base, "--ea-model-path", "head"]
    if command == "python -m eagle_gto":
        cli.load_model(cli.parse_args(paths))
    elif command == "gen_answer":
        gen_answer.load_model(gen_answer.parse_args(paths))
    else:
        servers.load_model(servers.build_parser("server", "", 0).parse_args(paths))
    return loaded["dtype"]


COMMANDS = ["python -m eagle_gto", "gen_answer", "servers"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_loads_the_same_dtype_for_auto(command, tmp_path, monkeypatch):
    """Before, gen_answer loaded bfloat16 on a GPU and the others float16, whatever the checkpoint."""
    assert dtype_loaded_by(command, None, monkeypatch) == torch.float16  # the demo base is saved in float16
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    assert dtype_loaded_by(command, str(tmp_path), monkeypatch) == torch.bfloat16
    assert dtype_loaded_by(command, str(tmp_path), monkeypatch, gpu=False) == torch.float32


@pytest.mark.parametrize("command", COMMANDS)
def test_device_and_device_map_name_the_same_option_in_every_command(command):
    """gen_answer named the base's device map --device, the others --device-map: both names work in each."""
    parse = {"python -m eagle_gto": cli.parse_args, "gen_answer": gen_answer.parse_args,
             "servers": servers.build_parser("server", "", 0).parse_args}[command]
    options = {name: vars(parse([name, "cpu"])) for name in ("--device", "--device-map")}
    assert options["--device"] == options["--device-map"]
    assert "cpu" in options["--device"].values()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("gpu", [2, -1])
def test_a_gpu_the_machine_lacks_is_refused_before_the_model_loads(command, gpu, two_gpus, monkeypatch, capsys):
    """--device cuda:2 on a machine with two GPUs passed every check and failed part-way through loading, in
    torch's words; cuda:-1, which torch.device refuses, passed the check too."""
    assert load_on(command, f"cuda:{gpu}") == 2
    assert f"there is no GPU {gpu} here; {two_gpus}" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device,machine,one", [("xpu:2", "two_xpus", "XPU"), ("mps:1", "an_mps", "MPS device")])
def test_an_xpu_or_mps_device_the_machine_lacks_is_refused_before_the_model_loads(command, device, machine, one,
                                                                                 request, capsys):
    """Only a CUDA index was checked: xpu:2 beside two XPUs, or mps:1 (a Mac has mps:0 alone), failed part-way
    through loading, in torch's words."""
    there_are = request.getfixturevalue(machine)
    assert load_on(command, device) == 2
    assert f"there is no {one} {device[-1]} here; {there_are}" in capsys.readouterr().err


def load_on(command: str, device: str) -> int:
    """The exit status of `command` loading a model (base, head: paths that do not exist) on --device `device`."""
    argv = ["--base-model-path", "base", "--ea-model-path", "head", "--device", device, "--dtype", "float16"]
    parser = servers.build_parser("server", "", 0)
    run = {"python -m eagle_gto": lambda: cli.main(argv), "gen_answer": lambda: gen_answer.cli(argv),
           "servers": lambda: servers.load_runner(parser, parser.parse_args(argv))}[command]
    try:
        return run()
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("command", ["python -m eagle_gto", "gen_answer"])
@pytest.mark.parametrize("given", ["--base-model-path", "--ea-model-path"])
def test_one_model_path_alone_is_refused_by_its_option_name_before_anything_loads(command, given, capsys):
    """These two said it once the model loaded (gen_answer after reading the questions), naming from_pretrained's
    arguments (base_model_path) where the servers and the other commands name the options."""
    parse = {"python -m eagle_gto": cli.parse_args, "gen_answer": gen_answer.parse_args}[command]
    with pytest.raises(SystemExit) as stop:
        parse([given, "folder"])
    assert stop.value.code == 2
    assert "give both --base-model-path and --ea-model-path, or neither for the demo pair" in capsys.readouterr().err


def test_training_loads_the_base_as_auto_does(tmp_path, monkeypatch):
    """eagle_gto.train has no --dtype: its base loaded in bfloat16 on a GPU whatever the checkpoint, so a head for a
    float16 base learned other features than the engine's --dtype auto then gave it."""
    import accelerate

    from eagle_gto import loading
    from eagle_gto.train import __main__ as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate, "PartialState", lambda: SimpleNamespace(device="cuda"))
    loaded = []

    class Base:
        def to(self, device):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(loading, "load_base", lambda path, dtype: loaded.append(dtype) or Base())
    for saved in ("float16", "bfloat16"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": saved}))
        cli.load_base(str(tmp_path))
        assert loaded.pop() == getattr(torch, saved)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli.load_base(str(tmp_path))
    assert loaded.pop() == torch.float32


def test_help_says_each_default_once_and_only_where_there_is_one():
    """show_defaults: a default of 0 is said; a flag's False, a None and a suppressed default are not (they say
    nothing a user could pass); a help that states its default is left as it is."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=0, help="steps to run")
    parser.add_argument("--plain", default="x")
    parser.add_argument("--resume", action="store_true", help="go on")
    parser.add_argument("--path", help="a file")
    parser.add_argument("--quiet", default=argparse.SUPPRESS, help="say less")
    parser.add_argument("--dtype", default="auto", help="weights dtype (default: auto)")
    show_defaults(parser)
    helps = {action.dest: parser._get_formatter()._expand_help(action) for action in parser._actions if action.help}
    assert helps == {"help": "show this help message and exit", "steps": "steps to run (default: 0)",
                     "plain": "default: x", "resume": "go on", "path": "a file", "quiet": "say less",
                     "dtype": "weights dtype (default: auto)"}
