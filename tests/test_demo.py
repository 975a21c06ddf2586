"""The embedded demo pair: where it is, that it loads, that it is lossless
and that its head actually drafts well."""

import json
from pathlib import Path

import pytest
import torch

import eagle_gto.demo as demo
from eagle_gto import CheckpointError, EaModel
from eagle_gto.demo.measure import humaneval_prompts, measure

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "question.jsonl"


@pytest.fixture(scope="module")
def model():
    return EaModel.from_pretrained(dtype=torch.float32)  # no paths: the demo pair


def test_demo_paths_name_loadable_folders():
    base, head = demo.demo_paths("eagle3")
    assert (Path(base) / "model.safetensors").is_file() and (Path(base) / "tokenizer.json").is_file()
    config = json.loads((Path(head) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and "draft_vocab_size" in config
    assert demo.demo_paths()[0] == base
    with pytest.raises(ValueError, match="unknown demo head"):
        demo.demo_paths("medusa")


def test_default_head_and_missing_gto(tmp_path, monkeypatch):
    for name in ("base", "eagle3"):
        (tmp_path / name).mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"")
    (tmp_path / "eagle3" / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    assert demo.demo_paths() == (str(tmp_path / "base"), str(tmp_path / "eagle3"))
    with pytest.raises(CheckpointError, match="gto head is not built"):
        demo.demo_paths("gto")
    (tmp_path / "heads.json").write_text(json.dumps({"default": "gto"}))
    assert demo.demo_paths()[1] == str(tmp_path / "eagle3")  # named default absent: fall back
    (tmp_path / "gto").mkdir()
    (tmp_path / "gto" / "config.json").write_text("{}")
    assert demo.demo_paths()[1] == str(tmp_path / "gto")


def test_shipped_heads_share_the_base_and_the_default_is_the_better():
    base, eagle3 = demo.demo_paths(head="eagle3")
    gto_base, gto = demo.demo_paths(head="gto")
    assert gto_base == base and gto != eagle3
    index = json.loads((demo.ASSETS / "heads.json").read_text())
    mean = {name: sum(tau.values()) / len(tau) for name, tau in index["tau"].items()}
    assert index["default"] == max(mean, key=mean.get)
    assert demo.demo_paths() == demo.demo_paths(head=index["default"])
    for head in (eagle3, gto):
        m = EaModel.from_pretrained(base, head, dtype=torch.float32)
        ids = m.tokenizer("def add(a, b):\n", return_tensors="pt").input_ids
        assert m.use_eagle3  # both are EAGLE-3 heads of the same base
        assert torch.equal(m.eagenerate(ids, max_new_tokens=16), m.naivegenerate(ids, max_new_tokens=16))


def test_demo_pair_is_greedy_identical_to_plain_decoding(model):
    for text in ("import os\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n"):
        ids = model.tokenizer(text, return_tensors="pt").input_ids
        spec = model.eagenerate(ids, max_new_tokens=48)
        assert model.last_stats.iterations < model.last_stats.new_tokens  # drafts were accepted
        assert torch.equal(spec, model.naivegenerate(ids, max_new_tokens=48))


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"benchmark data not found at {HUMANEVAL}")
def test_demo_head_accepts_on_humaneval(model):
    prompts = humaneval_prompts(HUMANEVAL, model.tokenizer)[:4]
    result = measure(model, prompts, max_new_tokens=48)
    assert result.identical == len(prompts)
    assert result.tau > 1.5


def test_without_a_dtype_a_cpu_load_is_float32_else_the_checkpoints():
    """The demo is saved in float16; half precision on the CPU is slow, so a
    load without a device map defaults to float32 (as transformers 4 did), and
    an explicit dtype is kept."""
    assert json.loads((Path(demo.demo_paths()[0]) / "config.json").read_text())["dtype"] == "float16"
    loaded = EaModel.from_pretrained()
    assert loaded.base_model.dtype == torch.float32 and next(loaded.ea_layer.parameters()).dtype == torch.float32
    half = EaModel.from_pretrained(torch_dtype=torch.float16)
    assert half.base_model.dtype == torch.float16
