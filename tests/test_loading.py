"""Loading a base model and a head: what must load, and a clear
CheckpointError (naming the folder or file) for what must not."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pairs import VOCAB
from transformers import AutoModelForCausalLM

from eagle_gto import CheckpointError, EaModel
from eagle_gto.__main__ import main
from eagle_gto.checkpoint import save_head
from eagle_gto.tiny import ARCHITECTURES, base_config, head_config, random_head

TREE = dict(total_token=12, depth=3, top_k=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny bases of every tested architecture (Llama also with tied
    embeddings), and an EAGLE-3 and an EAGLE-1 head for the Llama one."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    for arch in ARCHITECTURES:
        AutoModelForCausalLM.from_config(base_config(arch, vocab_size=VOCAB)).save_pretrained(root / arch)
    cfg = base_config("llama", vocab_size=VOCAB)
    cfg.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "tied")
    assert "lm_head.weight" not in load_file(str(root / "tied" / "model.safetensors"))
    save_head(random_head(head_config(cfg, "eagle3", draft_vocab_size=40)), root / "eagle3")
    save_head(random_head(head_config(cfg, "eagle1")), root / "eagle1")
    return root


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **values):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(values)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("base", [*ARCHITECTURES, "tied"])
def test_good_bases_load(saved, base):
    model = EaModel.from_pretrained(str(saved / base), str(saved / "eagle3"), **TREE)
    ids = torch.randint(0, VOCAB, (1, 5))
    assert model.eagenerate(ids, max_new_tokens=8).tolist() == model.naivegenerate(ids, max_new_tokens=8).tolist()


@pytest.mark.parametrize("options", [dict(dtype=torch.float16), dict(device_map="cpu"),
                                     dict(device_map="auto", dtype=torch.float32)])
def test_dtype_and_device_map_variants_load(saved, options):
    model = EaModel.from_pretrained(str(saved / "tied"), str(saved / "eagle3"), **TREE, **options)
    assert model.eagenerate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4).shape[1] == 7


def test_a_base_missing_a_tensor_is_refused(saved, tmp_path):
    base = copy(saved / "llama", tmp_path / "base")
    state = load_file(str(base / "model.safetensors"))
    del state["model.layers.3.mlp.down_proj.weight"]
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{base}: .*missing tensors.*model.layers.3.mlp.down_proj.weight"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))


def test_a_truncated_base_names_the_file(saved, tmp_path):
    base = copy(saved / "llama", tmp_path / "base")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{base / 'model.safetensors'}: corrupt or truncated"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))


@pytest.mark.parametrize("change,shape", [(dict(hidden_size=128), r"\[96, 64\] where config.json implies \[96, 128\]"),
                                          (dict(vocab_size=200), r"\[96, 64\] where config.json implies \[200, 64\]")])
def test_a_config_that_contradicts_the_weights_is_refused(saved, tmp_path, change, shape):
    base = copy(saved / "llama", tmp_path / "base")
    edit_config(base, **change)
    with pytest.raises(CheckpointError, match=f"{base}: .*wrong shape: .*model.embed_tokens.weight {shape}"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))


@pytest.mark.parametrize("head", ["eagle3", "eagle1"])
def test_swapped_paths_are_named(saved, head):
    """An EAGLE-3 head says so in its config; an EAGLE-1 head's config looks
    like a Llama's, so its weight names tell."""
    with pytest.raises(CheckpointError, match="swapped"):
        EaModel.from_pretrained(str(saved / head), str(saved / "llama"))


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size="64"), "hidden_size must be a positive integer, found '64'"),
    (dict(hidden_size=None), "hidden_size must be a positive integer, found None"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, found 0"),
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(rms_norm_eps="tiny"), "rms_norm_eps must be a positive number"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported rope scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling factor must be a positive number, found None"),
])
def test_bad_head_config_values_name_the_file(saved, tmp_path, change, message):
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_config(head, **change)
    with pytest.raises(CheckpointError, match=f"{head / 'config.json'}: {message}"):
        EaModel.from_pretrained(str(saved / "llama"), str(head))


def test_device_map_cuda_without_cuda(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device_map='cuda' places the model on CUDA, but CUDA is not available"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), device_map="cuda")


def test_cli_device_map_none_means_no_device_map(capsys):
    assert main(["--device-map", "none", "--max-new-tokens", "4", "--no-compare", "--total-token", "8",
                 "--depth", "3", "--tree-top-k", "3"]) == 0
    assert "speculative" in capsys.readouterr().out
