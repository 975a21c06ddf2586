"""Loading a base model and a head: what must load, and a clear
CheckpointError (naming the folder or file) for what must not."""

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pairs import VOCAB
from transformers import AutoModelForCausalLM

from eagle_gto import CheckpointError, EaModel, checkpoint, ea_model
from eagle_gto.__main__ import main
from eagle_gto.checkpoint import build_head, load_checkpoint, save_head
from eagle_gto.loading import load_base
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


def edit_weights(folder, edit) -> None:
    """Rewrite folder/model.safetensors with `edit(state)` applied to its tensors."""
    path = str(folder / "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


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
    # Saved without tokenizer files: no tokenizer (transformers makes an empty one for Qwen, whose EOS id 0
    # would stop generation), so generation runs to max_new_tokens as transformers' generate does.
    assert model.tokenizer is None and not model._stop_ids(False, None)
    ids = torch.randint(0, VOCAB, (1, 5))
    assert model.eagenerate(ids, max_new_tokens=8).tolist() == model.naivegenerate(ids, max_new_tokens=8).tolist()


@pytest.mark.parametrize("options", [dict(dtype=torch.float16), dict(device_map="cpu"),
                                     dict(device_map="auto", dtype=torch.float32), dict(torch_dtype="auto")])
def test_dtype_and_device_map_variants_load(saved, options):
    model = EaModel.from_pretrained(str(saved / "tied"), str(saved / "eagle3"), **TREE, **options)
    assert model.eagenerate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4).shape[1] == 7


def test_the_reference_web_uis_loading_arguments(saved):
    """The reference's web UI passes low_cpu_mem_usage and load_in_8bit/load_in_4bit=False, which
    transformers 5 refuses (load_in_8bit): they load as before."""
    model = EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), **TREE, low_cpu_mem_usage=True,
                                    load_in_8bit=False, load_in_4bit=False, use_eagle3=True)
    ids = torch.randint(0, VOCAB, (1, 5))
    assert model.eagenerate(ids, max_new_tokens=6).tolist() == model.naivegenerate(ids, max_new_tokens=6).tolist()


@pytest.mark.parametrize("bits,given", [(8, {}), (4, {}), (8, dict(quantization_config=None))])
def test_load_in_bits_asks_transformers_for_bitsandbytes(saved, monkeypatch, bits, given):
    """quantization_config=None beside load_in_8bit is none given (a caller passing its own default)."""
    from transformers import BitsAndBytesConfig

    seen = {}

    def load_base(path, **kwargs):
        seen.update(kwargs)
        raise CheckpointError("stop here")

    monkeypatch.setattr(ea_model, "load_base", load_base)
    with pytest.raises(CheckpointError, match="stop here"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), **{f"load_in_{bits}bit": True}, **given)
    config = seen["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig)
    assert (config.load_in_8bit, config.load_in_4bit) == (bits == 8, bits == 4)
    assert "load_in_8bit" not in seen and "load_in_4bit" not in seen


@pytest.mark.parametrize("options", [dict(load_in_8bit=True, load_in_4bit=True),
                                     dict(load_in_4bit=True, quantization_config={"load_in_4bit": True})])
def test_load_in_bits_conflicts(saved, options):
    with pytest.raises(ValueError, match="not both"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), **options)


def test_a_quantized_base_steps_eagerly(saved):
    """No CUDA graphs for quantized kernels (not checked under capture): off by default, refused when asked."""
    model = EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), **TREE)
    model.base_model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    assert EaModel(model.base_model, model.ea_layer, None, **TREE).cuda_graphs is False
    with pytest.raises(ValueError, match="not supported for a quantized base model"):
        EaModel(model.base_model, model.ea_layer, None, **TREE, cuda_graphs=True)


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
    """(Through from_pretrained the head is checked against the base's
    config.json first, so this is load_base's own check.)"""
    base = copy(saved / "llama", tmp_path / "base")
    edit_config(base, **change)
    with pytest.raises(CheckpointError, match=f"{base}: .*wrong shape: .*model.embed_tokens.weight {shape}"):
        load_base(str(base))
    # unless the caller asks transformers to re-initialise such tensors
    cfg = json.loads((base / "config.json").read_text())
    model = load_base(str(base), ignore_mismatched_sizes=True)
    assert tuple(model.get_input_embeddings().weight.shape) == (cfg["vocab_size"], cfg["hidden_size"])


def test_a_head_that_does_not_fit_the_base_config_fails_before_the_base_loads(saved, tmp_path, monkeypatch):
    base = copy(saved / "llama", tmp_path / "base")
    edit_config(base, vocab_size=200)
    monkeypatch.setattr(ea_model, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(CheckpointError, match="head vocab_size 96 != base model vocab_size 200"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))


@pytest.mark.parametrize("head", ["eagle3", "eagle1"])
def test_swapped_paths_are_named(saved, head):
    """An EAGLE-3 head says so in its config; an EAGLE-1 head's config looks
    like a Llama's, so its weight names tell."""
    with pytest.raises(CheckpointError, match="swapped"):
        EaModel.from_pretrained(str(saved / head), str(saved / "llama"))


def test_an_eagle1_head_given_as_the_base_is_named_by_its_weights(saved):
    """EaModel loads the head first, so the test above stops at the base given as the head; load_base on its own
    (an EAGLE-1 head's config.json reads as a Llama's) tells the head by its fc.weight."""
    with pytest.raises(CheckpointError, match=r"they look like an EAGLE draft head's: are base_model_path and "
                                              r"ea_model_path swapped\?"):
        load_base(str(saved / "eagle1"))


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size="64"), "hidden_size must be a positive integer, found '64'"),
    (dict(hidden_size=None), "hidden_size must be a positive integer, found None"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, found 0"),
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(num_attention_heads=6), r"hidden_size=64 is not a multiple of num_attention_heads=6 \(and no head_dim"),
    (dict(head_dim=7), "the head dimension 7 is odd"),
    (dict(hidden_size=60), "the head dimension 15 is odd"),  # 60 / 4 heads, without a head_dim
    (dict(rms_norm_eps="tiny"), "rms_norm_eps must be a positive number"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported rope scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling factor must be a positive number, found None"),
    (dict(qkv_bias="false"), "qkv_bias must be true or false, found 'false'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1"}),
     "rope_scaling low_freq_factor must be a positive number, found '1'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": None}),
     "rope_scaling original_max_position_embeddings must be a positive number, found None"),
])
def test_bad_head_config_values_name_the_file(saved, tmp_path, change, message):
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_config(head, **change)
    with pytest.raises(CheckpointError, match=f"{head / 'config.json'}: {message}"):
        EaModel.from_pretrained(str(saved / "llama"), str(head))


def test_an_eagle1_heads_bias_must_be_true_or_false(saved, tmp_path):
    """`"bias": "false"` read as true: the head loaded with the fc bias the config said it has not."""
    head = copy(saved / "eagle1", tmp_path / "head")
    edit_config(head, bias="false")
    with pytest.raises(CheckpointError, match=f"{head / 'config.json'}: bias must be true or false, found 'false'"):
        load_checkpoint(str(head))


@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", 0, {"": 1}, {"": "cuda:1"}])
def test_device_map_cuda_without_cuda(saved, monkeypatch, device_map):
    """A CUDA device given by name or by index (as transformers takes one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"device_map={device_map!r} places the model on CUDA, but CUDA is not "
                                         "available"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), device_map=device_map)


@pytest.mark.parametrize("device_map", ["cuda:2", 2, {"": 2}, {"model": 0, "lm_head": "cuda:2"},
                                        torch.device("cuda", 2)])
def test_device_map_naming_a_gpu_the_machine_lacks(device_map, two_gpus):
    """By name or by index: refused before anything loads, naming the GPUs there are."""
    with pytest.raises(ValueError) as info:
        EaModel.from_pretrained("no-base", "no-head", device_map=device_map)
    assert str(info.value) == (f"device_map={device_map!r} places the model on CUDA, but there is no GPU 2 here; "
                               f"{two_gpus}")


@pytest.mark.parametrize("device_map", ["cuda:-1", -1, {"lm_head": "cuda:-1"}])
def test_device_map_naming_a_negative_gpu(device_map, two_gpus):
    """"cuda:-1", which torch.device refuses, was not checked: it failed later, in words that named no GPU."""
    with pytest.raises(ValueError) as info:
        EaModel.from_pretrained("no-base", "no-head", device_map=device_map)
    assert str(info.value) == (f"device_map={device_map!r} places the model on CUDA, but there is no GPU -1 here; "
                               f"{two_gpus}")


@pytest.mark.parametrize("device_map", [0, {"": 1}, {"model": 0, "lm_head": "xpu:0"}])
def test_a_plain_gpu_index_on_another_accelerator_is_not_refused_as_cuda(device_map, two_xpus):
    """A device map's plain index names the machine's accelerator (torch.device(0)): an XPU or MPS one was
    refused as "CUDA is not available"."""
    from eagle_gto.loading import check_device_map

    check_device_map(device_map)


@pytest.mark.parametrize("device_map,machine,problem", [
    ("xpu:3", "two_xpus", "XPU, but there is no XPU 3 here; {there_are}"),
    ({"model": "xpu:0", "lm_head": "xpu:2"}, "two_xpus", "XPU, but there is no XPU 2 here; {there_are}"),
    ("mps:1", "an_mps", "MPS, but there is no MPS device 1 here; {there_are}"),
    ("xpu:0", "an_mps", "XPU, but XPU is not available here (torch {torch}); use cpu"),
    ("mps", "two_xpus", "MPS, but MPS is not available here (torch {torch}); use cpu"),
])
def test_device_map_naming_an_xpu_or_mps_device_the_machine_lacks(device_map, machine, problem, request):
    """Only CUDA devices were checked: xpu:3 beside two XPUs, or mps:1 (a Mac has mps:0 alone), failed part-way
    through loading, in torch's words."""
    there_are = request.getfixturevalue(machine)
    with pytest.raises(ValueError) as info:
        EaModel.from_pretrained("no-base", "no-head", device_map=device_map)
    assert str(info.value) == (f"device_map={device_map!r} places the model on "
                               + problem.format(there_are=there_are, torch=torch.__version__))


def test_device_map_naming_gpus_the_machine_has(two_gpus):
    from eagle_gto.loading import check_device_map

    for device_map in ("cuda", "cuda:1", 0, {"model": 0, "lm_head": "cuda:1"}, "auto", "cpu", {"": "cpu"}):
        check_device_map(device_map)


def test_a_plain_gpu_index_on_a_cuda_machine_is_checked_as_a_cuda_gpu(two_gpus, monkeypatch):
    """Where CUDA is the machine's accelerator (torch.accelerator has one there too), a device map's plain index
    is a CUDA GPU: one the machine lacks is refused before anything loads, not passed on as an XPU's or MPS's."""
    from eagle_gto.devices import device_problem

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert device_problem(2) == f"there is no GPU 2 here; {two_gpus}"
    assert device_problem(1) is None


def test_a_gpu_the_machine_lacks_is_refused_naming_its_only_gpu(monkeypatch):
    from eagle_gto.devices import device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Stand-in GPU {index}")
    assert device_problem("cuda:1") == "there is no GPU 1 here; there is one: cuda:0 (Stand-in GPU 0)"


def test_quantization_given_twice_is_refused_before_anything_loads():
    """The reference's load_in_8bit/load_in_4bit become a quantization_config: one of them, and not beside one."""
    from eagle_gto.loading import quantization_options

    for options, message in (({"load_in_8bit": True, "load_in_4bit": True}, "load_in_8bit or load_in_4bit, not both"),
                             ({"load_in_4bit": True, "quantization_config": {}}, "or quantization_config, not both")):
        with pytest.raises(ValueError, match=message):
            quantization_options(options)


def test_cli_device_map_none_means_no_device_map(capsys):
    assert main(["--device-map", "none", "--max-new-tokens", "4", "--no-compare", "--total-token", "8",
                 "--depth", "3", "--tree-top-k", "3"]) == 0
    assert "speculative" in capsys.readouterr().out


def hub_cache(root, repo, source):
    """`source`'s files as a hub cache holds a downloaded repository."""
    snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return root


def test_hub_ids_load_from_the_cache_without_the_hub(saved, tmp_path):
    """Offline (local_files_only), from a given cache_dir: a head that has
    only model.safetensors (pytorch_model.bin, tried first, is not cached)."""
    cache = hub_cache(hub_cache(tmp_path, "org/base", saved / "llama"), "org/head", saved / "eagle3")
    model = EaModel.from_pretrained("org/base", "org/head", cache_dir=str(cache), local_files_only=True, **TREE)
    assert model.eagenerate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4).shape[1] == 7
    with pytest.raises(CheckpointError, match="org/missing: not a local folder, and the hub could not be reached"):
        EaModel.from_pretrained("org/base", "org/missing", cache_dir=str(cache), local_files_only=True)


def test_a_home_relative_path_is_a_folder(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    copy(saved / "llama", tmp_path / "base")
    copy(saved / "eagle3", tmp_path / "head")
    assert EaModel.from_pretrained("~/base", "~/head", **TREE).ea_layer.kind == "eagle3"


def test_weights_offloaded_to_disk_are_refused(saved, tmp_path):
    with pytest.raises(CheckpointError, match="device_map left weights offloaded, on disk or unloaded"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), device_map="auto",
                                max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "offload"))


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
@pytest.mark.parametrize("on_disk", ["model.layers.5", "model.embed_tokens", "lm_head"])
def test_a_base_loaded_with_offloaded_weights_is_refused_by_eamodel_too(saved, tmp_path, kind, on_disk):
    # EaModel(base, head) directly: the head went to the meta device beside an offloaded last layer (its weights
    # lost), a shared offloaded embedding failed in torch's words, other cases failed mid-generation.
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(6)}, **{on_disk: "disk"})
    base = AutoModelForCausalLM.from_pretrained(str(saved / "llama"), device_map=device_map, dtype=torch.float32,
                                                offload_folder=str(tmp_path / "offload"))
    head = build_head(load_checkpoint(str(saved / kind)))
    with pytest.raises(CheckpointError, match=rf"base_model: device_map left weights offloaded.*\({on_disk}\."):
        EaModel(base, head, None, **TREE)
    assert {p.device.type for p in head.parameters()} == {"cpu"}  # refused before the head moves


@pytest.mark.parametrize("device_map", [{"": "disk"}, {"model": "cpu", "lm_head": "disk"}, "meta",
                                        {"model": torch.device("meta"), "lm_head": "cpu"}])
def test_a_device_map_that_offloads_by_name_is_refused_before_the_base_loads(saved, tmp_path, monkeypatch,
                                                                            device_map):
    monkeypatch.setattr(ea_model, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(ValueError, match="device_map places weights on '(disk|meta)': the engine needs every weight"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), device_map=device_map,
                                offload_folder=str(tmp_path / "offload"))


def test_a_base_offloaded_after_loading_is_refused_at_the_next_generation(saved, tmp_path):
    from accelerate import disk_offload

    model = EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), **TREE)
    model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    disk_offload(model.base_model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    # (it failed making the new caches, in torch's words: "Cannot copy out of meta tensor")
    with pytest.raises(CheckpointError, match="base_model: device_map left weights offloaded"):
        model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)

@pytest.mark.parametrize("content,message", [
    (b"", "an empty file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "a web page"),
    (b"\r\n  <html><body>Not found</body></html>", "a web page"),  # (servers may send blank lines first)
])
def test_weight_files_that_are_not_weights_are_named(saved, tmp_path, content, message):
    base = copy(saved / "llama", tmp_path / "base")
    (base / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{base / 'model.safetensors'}: {message}"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))
    (base / "model.safetensors").unlink()  # a base saved as pytorch_model.bin
    (base / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{base / 'pytorch_model.bin'}: {message}"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))
    head = copy(saved / "eagle3", tmp_path / "head")
    (head / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{head / 'pytorch_model.bin'}: {message}"):
        EaModel.from_pretrained(str(saved / "llama"), str(head))


def test_a_broken_shard_index_is_a_checkpoint_error(saved, tmp_path):
    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(saved / "llama")).save_pretrained(base, max_shard_size="100KB")
    index = base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))  # no weight_map
    with pytest.raises(CheckpointError, match=f"{base}: cannot load the base model: KeyError"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))


def test_decoder_layers_the_config_leaves_out_are_refused(saved, tmp_path):
    """Six layers of weights under a config that says four: transformers
    would drop two with a log line and decode with a different model."""
    base = copy(saved / "llama", tmp_path / "base")
    edit_config(base, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match="decoder-layer tensors config.json has no place for.*model.layers.4"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"))


def test_a_tokenizer_that_does_not_load_is_an_error(tmp_path):
    from eagle_gto.demo import demo_paths

    base_path, head_path = demo_paths()
    base = copy(base_path, tmp_path / "base")
    (base / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{base}: the tokenizer .*tokenizer.json.* does not load"):
        EaModel.from_pretrained(str(base), head_path)


@pytest.mark.parametrize("content", ['{"eos_token_id": [1, 2', "[1, 2]",
                                     '{"eos_token_id": 2, "note": "caf\u00e9"}'.encode("latin-1")])  # not UTF-8
def test_a_corrupt_generation_config_is_an_error(saved, tmp_path, content):
    """transformers reads a generation_config.json that does not parse as missing (one info log line), so
    the stop ids it lists (Llama-3-Instruct's <|eot_id|>) would silently not stop generation."""
    base = copy(saved / "llama", tmp_path / "base")
    file = base / "generation_config.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=f"{file}: "):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"), **TREE)


def test_a_folder_named_generation_config_is_an_error(saved, tmp_path):
    base = copy(saved / "llama", tmp_path / "base")
    (base / "generation_config.json").unlink()
    (base / "generation_config.json").mkdir()
    with pytest.raises(CheckpointError, match="generation_config.json: a folder, not a generation config"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"), **TREE)


def test_a_corrupt_generation_config_in_a_subfolder_is_an_error(saved, tmp_path):
    # The base's subfolder is where transformers reads it from, not the repository's top.
    base = copy(saved / "llama", tmp_path / "repo" / "base")
    (base / "generation_config.json").write_text('{"eos_token_id": [1, 2')
    with pytest.raises(CheckpointError, match=f"{base / 'generation_config.json'}: not valid JSON"):
        EaModel.from_pretrained(str(tmp_path / "repo"), str(saved / "eagle3"), subfolder="base", **TREE)


def test_a_folder_named_as_a_weights_file_is_a_checkpoint_error(saved, tmp_path):
    base = copy(saved / "llama", tmp_path / "base")
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=f"{base}"):
        EaModel.from_pretrained(str(base), str(saved / "eagle3"), **TREE)


def test_a_truncated_base_in_a_subfolder_names_the_file(saved, tmp_path):
    base = copy(saved / "llama", tmp_path / "repo" / "base")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{base / 'model.safetensors'}: corrupt or truncated"):
        EaModel.from_pretrained(str(tmp_path / "repo"), str(saved / "eagle3"), subfolder="base")


def test_a_tokenizer_saved_only_as_a_sentencepiece_model_loads(tmp_path):
    """Vicuna v1.3 (the base of the reference's README example) ships its tokenizer only as a SentencePiece
    `tokenizer.model`: transformers converts it with sentencepiece and protobuf, core requirements for that
    reason. The converted tokenizer splits text as SentencePiece itself does."""
    import sentencepiece

    words = ["the", "draft", "tree", "accepts", "tokens", "that", "the", "target", "verifies"]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(6)) for i in range(100)]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=48,
                                             model_type="bpe", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    base = tmp_path / "base"
    cfg = base_config("llama", vocab_size=48)
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    (base / "tokenizer.model").write_bytes(proto.getvalue())
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    save_head(random_head(head_config(cfg, "eagle1")), tmp_path / "head")
    model = EaModel.from_pretrained(str(base), str(tmp_path / "head"), **TREE)
    text = "the target accepts the draft tree"
    ids = model.get_tokenizer()(text, add_special_tokens=False).input_ids
    assert ids == sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue()).encode(text)
    assert model.tokenizer.decode(ids) == text and model.tokenizer.eos_token_id == 2


def test_a_tokenizer_of_custom_code_gets_trust_remote_code(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from eagle_gto.demo import demo_paths

    base_path, head_path = demo_paths()
    asked = []
    real = AutoTokenizer.from_pretrained

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs.get("trust_remote_code"))
        return real(*args, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    assert EaModel.from_pretrained(base_path, head_path, trust_remote_code=True).tokenizer is not None
    assert asked == [True]


def test_a_full_vocabulary_eagle3_head_needs_no_mapping(saved, tmp_path):
    """Vd == V: the mapping is the identity, and heads may leave d2t/t2d out."""
    cfg = base_config("llama", vocab_size=VOCAB)
    head = tmp_path / "head"
    save_head(random_head(head_config(cfg, "eagle3", draft_vocab_size=VOCAB)), head)
    edit_weights(head, lambda state: [state.pop("d2t"), state.pop("t2d")])
    model = EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)
    assert torch.equal(model.ea_layer.d2t, torch.zeros(VOCAB, dtype=torch.long)) and bool(model.ea_layer.t2d.all())
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(model.eagenerate(ids, max_new_tokens=8), model.naivegenerate(ids, max_new_tokens=8))
    small = copy(saved / "eagle3", tmp_path / "small")  # Vd < V: the mapping is needed
    edit_weights(small, lambda state: [state.pop("d2t"), state.pop("t2d")])
    with pytest.raises(CheckpointError, match="missing tensor d2t .*; missing tensor t2d"):
        EaModel.from_pretrained(str(saved / "llama"), str(small), **TREE)


def test_a_sharded_head_loads(saved, tmp_path):
    head = copy(saved / "eagle3", tmp_path / "head")
    state = load_file(str(head / "model.safetensors"))
    (head / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(head / shard))
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    (head / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)
    for key, value in model.ea_layer.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
    index = head / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**weight_map, "extra.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=f"{index}: the shards lack tensors the index names: extra.weight"):
        checkpoint.read_weights(str(head))
    (head / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{head}: no model-00002-of-00002.safetensors"):
        EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)


@pytest.mark.parametrize("shard", [None, 1])
def test_a_head_shard_index_naming_no_file_is_refused(saved, tmp_path, shard):
    """A shard name that is not a string failed with a raw TypeError from building its path."""
    head = copy(saved / "eagle3", tmp_path / "head")
    (head / "model.safetensors").unlink()
    index = head / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"fc.weight": shard}}))
    with pytest.raises(CheckpointError, match=f"{index}: the weight_map maps tensors to {shard}, not a shard's file"):
        checkpoint.read_weights(str(head))


def test_t2d_is_rebuilt_from_d2t_when_a_head_leaves_it_out(saved, tmp_path):
    """The reference never reads t2d; it is the set of target ids d2t maps to."""
    head = copy(saved / "eagle3", tmp_path / "head")
    t2d = load_file(str(head / "model.safetensors"))["t2d"]
    edit_weights(head, lambda state: state.pop("t2d"))
    model = EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)
    assert torch.equal(model.ea_layer.t2d, t2d)
    edit_weights(head, lambda state: state.update(d2t=state["d2t"] + VOCAB))  # past the vocabulary: no t2d
    with pytest.raises(CheckpointError, match="missing tensor t2d"):
        EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)


def test_d2t_is_rebuilt_from_t2d_when_a_head_leaves_it_out(saved, tmp_path):
    """The draft vocabulary is the target ids t2d marks, in ascending order
    (formats.md): d2t follows from t2d as t2d from d2t."""
    head = copy(saved / "eagle3", tmp_path / "head")
    used = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:40].sort().values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[used] = True
    edit_weights(head, lambda state: [state.pop("d2t"), state.update(t2d=t2d)])
    model = EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)
    assert torch.equal(model.ea_layer.d2t, used - torch.arange(40))
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(model.eagenerate(ids, max_new_tokens=8), model.naivegenerate(ids, max_new_tokens=8))
    edit_weights(head, lambda state: state["t2d"].__setitem__(state["t2d"].nonzero()[0], False))  # one mark short
    with pytest.raises(CheckpointError, match="missing tensor d2t"):
        EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)


def test_t2d_must_mark_what_d2t_maps_to(saved, tmp_path):
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_weights(head, lambda state: state.update(t2d=torch.ones_like(state["t2d"])))
    with pytest.raises(CheckpointError, match="t2d marks 96 target ids, which are not the 40"):
        EaModel.from_pretrained(str(saved / "llama"), str(head))


def last_target_is(state, target):
    """d2t's last draft id mapped to `target` (t2d left as it was)."""
    state["d2t"][-1] = target - (state["d2t"].shape[0] - 1)


@pytest.mark.parametrize("edit,message", [
    (lambda state: state["d2t"].__setitem__(1, state["d2t"][0] - 1),  # draft ids 0 and 1: one target id
     "d2t maps two draft ids to the same target id"),
    (lambda state: state.update(t2d=state["t2d"].roll(1)), "t2d marks 40 target ids, which are not the 40"),
    (lambda state: last_target_is(state, VOCAB), "d2t maps draft ids outside the target vocabulary"),
    (lambda state: last_target_is(state, -1), "d2t maps draft ids outside the target vocabulary"),
    # and no t2d: none is rebuilt from a d2t that is no mapping
    (lambda state: [last_target_is(state, VOCAB), state.pop("t2d")], "missing tensor t2d"),
])
def test_a_vocabulary_mapping_that_is_no_mapping_is_refused(saved, tmp_path, edit, message):
    """d2t must map the draft ids onto distinct target ids (just past the
    vocabulary is past it), and t2d mark exactly those: the right number of
    marks is not enough."""
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_weights(head, edit)
    with pytest.raises(CheckpointError, match=f"{head / 'model.safetensors'}: .*{message}"):
        build_head(load_checkpoint(str(head)))


def test_tensors_a_head_has_no_place_for_are_refused_by_name_but_an_old_exports_rotary_buffer_is_dropped(
        saved, tmp_path):
    """Old exports saved the rotary frequencies, which are recomputed from the config; any other tensor the head
    has no place for (another model's, a newer variant's) would be ignored silently."""
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_weights(head, lambda state: state.update({"midlayer.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    build_head(load_checkpoint(str(head)))
    edit_weights(head, lambda state: state.update({"extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"{head / 'model.safetensors'}: .*unexpected tensors extra\.weight"):
        build_head(load_checkpoint(str(head)))


@pytest.mark.parametrize("switch,tensors", [("fc_norm", {f"fc_norm.{i}.weight": [64] for i in range(3)}),
                                             ("norm_before_fc", {"input_norm.weight": [192]})])
def test_norm_tensors_a_config_turns_off_are_refused_by_name(saved, tmp_path, switch, tensors):
    """The tensors turn a norm on only where config.json is silent (SpecForge and gpt-oss exports): one that says
    false there keeps the head without the norm, so the tensors are refused, not used against the config."""
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_weights(head, lambda state: state.update({key: torch.ones(shape) for key, shape in tensors.items()}))
    edit_config(head, **{switch: False})
    with pytest.raises(CheckpointError, match=rf"unexpected tensors {', '.join(tensors)}$"):
        build_head(load_checkpoint(str(head)))


@pytest.mark.parametrize("key,shape", [("fc.weight", [64, 192]), ("embed_tokens.weight", [VOCAB, 64])])
def test_a_transposed_tensor_is_refused_by_name(saved, tmp_path, key, shape):
    """The shape, not only the number of elements: a transposed weight (or a
    head's own embedding) is named with both shapes."""
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_weights(head, lambda state: state.update({key: torch.zeros(shape[::-1])}))
    with pytest.raises(CheckpointError, match=rf"tensor {key}: expected shape \[{shape[0]}, {shape[1]}\], "
                                              rf"found \[{shape[1]}, {shape[0]}\]"):
        build_head(load_checkpoint(str(head)))


def test_a_head_embedding_of_another_width_is_refused_by_name(saved, tmp_path):
    """The width as well as the vocabulary: a 32-wide embedding on a 64-wide head is as wrong as a short one."""
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_weights(head, lambda state: state.update({"embed_tokens.weight": torch.zeros(VOCAB, 32)}))
    with pytest.raises(CheckpointError, match=rf"tensor embed_tokens.weight: expected shape \[{VOCAB}, 64\], "
                                              rf"found \[{VOCAB}, 32\]"):
        build_head(load_checkpoint(str(head)))


@pytest.mark.parametrize("key,shape", [("fc.weight", [64, 192]), ("embed_tokens.weight", [VOCAB, 64])])
def test_integer_weights_are_refused_by_name(saved, tmp_path, key, shape):
    """Integer tensors (a quantized export's, without its scales) were cast into the float weights silently."""
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_weights(head, lambda state: state.update({key: torch.ones(shape, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"tensor {key}: expected floating-point weights, found torch.int8"):
        build_head(load_checkpoint(str(head)))


@pytest.mark.parametrize("key,value", [("fc.weight", math.nan), ("norm.weight", math.inf),
                                       ("embed_tokens.weight", -math.inf)])
def test_weights_with_nan_or_infinity_are_refused_by_name(saved, tmp_path, key, value):
    """A diverged training run exports NaN weights: they loaded silently, the
    output stayed right, and no draft was ever accepted."""
    head = copy(saved / "eagle3", tmp_path / "head")

    def spoil(state):
        weight = state.get(key, torch.randn(VOCAB, 64) * 0.02)  # (the saved head shares the base's embedding)
        weight.view(-1)[[3, 7]] = value
        state[key] = weight

    edit_weights(head, spoil)
    kind = "2 NaN and 0 infinite" if math.isnan(value) else "0 NaN and 2 infinite"
    with pytest.raises(CheckpointError, match=rf"{head / 'model.safetensors'}: tensor {key}: {kind} values"):
        EaModel.from_pretrained(str(saved / "llama"), str(head), **TREE)


def test_speculators_keys_tell_an_eagle3_head_without_a_config_that_says_so(tmp_path):
    """`layers.0.` keys (vLLM speculators naming) and a config.json without
    draft_vocab_size (a full draft vocabulary): the hidden_norm weight tells
    the kind."""
    original = random_head(head_config(base_config("llama", vocab_size=VOCAB), "eagle3"))
    save_head(original, tmp_path)
    edit_weights(tmp_path, lambda state: state.update(
        {key.replace("midlayer.", "layers.0."): state.pop(key) for key in list(state)}))
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["draft_vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    head = build_head(load_checkpoint(str(tmp_path)))
    assert head.kind == "eagle3"
    loaded = head.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in original.state_dict().items())


def test_an_eagle3_head_narrower_than_its_target_loads(saved, tmp_path):
    """An EAGLE-3 head's own width may differ from the target's: what must
    match the base is target_hidden_size (the features it reads), and the head
    then carries its own embedding."""
    cfg = base_config("llama", vocab_size=VOCAB)
    save_head(random_head(head_config(cfg, "eagle3", draft_vocab_size=40, hidden_size=32)), tmp_path / "head")
    with pytest.raises(CheckpointError, match="head hidden_size 32 != base hidden_size 64 and the head carries no "
                                              "embed_tokens.weight of its own"):  # (the target's is 64 wide)
        EaModel.from_pretrained(str(saved / "llama"), str(tmp_path / "head"), **TREE)
    embedding = torch.randn(VOCAB, 32) * 0.02
    edit_weights(tmp_path / "head", lambda state: state.update({"embed_tokens.weight": embedding}))
    model = EaModel.from_pretrained(str(saved / "llama"), str(tmp_path / "head"), **TREE)
    assert (model.ea_layer.config.hidden_size, model.ea_layer.config.target_hidden_size) == (32, 64)
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(model.eagenerate(ids, max_new_tokens=8), model.naivegenerate(ids, max_new_tokens=8))


def test_save_head_leaves_no_stale_pytorch_bin(saved, tmp_path):
    cfg = base_config("llama", vocab_size=VOCAB)
    old, new = (random_head(head_config(cfg, "eagle3", draft_vocab_size=40), seed=s) for s in (1, 2))
    save_head(old, tmp_path, pytorch_bin=True)
    save_head(new, tmp_path)
    assert not (tmp_path / "pytorch_model.bin").exists()
    loaded = checkpoint.load_checkpoint(str(tmp_path)).state
    assert torch.equal(loaded["fc.weight"], new.fc.weight)


def test_an_eagle3_head_config_is_told_by_its_draft_vocab_size_alone(saved, tmp_path):
    """Not every export names Eagle in `architectures`: draft_vocab_size says EAGLE-3 (formats.md)."""
    head = copy(saved / "eagle3", tmp_path / "head")
    edit_config(head, architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match="config.json describes an EAGLE draft head"):
        load_base(str(head))


def test_a_base_model_given_as_the_head_is_named(saved):
    with pytest.raises(CheckpointError, match="no fc.weight: not an EAGLE draft head .*swapped"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "llama"))


def test_device_and_dtype_arguments_are_checked_first(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device_map in (0, {"": 0}):
        with pytest.raises(ValueError, match="places the model on CUDA, but CUDA is not available"):
            EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), device_map=device_map)
    with pytest.raises(ValueError, match="torch_dtype='float33' is not a torch dtype"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), torch_dtype="float33")


def test_cli_reports_a_bad_path_in_one_line(capsys, tmp_path):
    assert main(["--base-model-path", str(tmp_path / "missing"), "--ea-model-path", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no config.json in this folder\n"


def test_tree_settings_are_checked_before_the_base_loads(saved, monkeypatch):
    monkeypatch.setattr(ea_model, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(ValueError, match="top_k=41 is larger than the draft head's vocabulary"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), total_token=12, depth=3, top_k=41)
    with pytest.raises(ValueError, match="total_token"):
        EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), total_token=0)
    for name, value in (("total_token", "12"), ("depth", 3.0), ("top_k", None)):
        with pytest.raises(ValueError, match=f"{name} must be an integer, got {value!r}"):
            EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), **{**TREE, name: value})
    # total_token=-1 is picked by timing once the model is built: depth and top_k are still checked first
    for name, value, message in (("depth", 3.0, "must be an integer, got 3.0"), ("top_k", -1, "must be >= 1, got -1")):
        with pytest.raises(ValueError, match=f"{name} {message}"):
            EaModel.from_pretrained(str(saved / "llama"), str(saved / "eagle3"), **{**TREE, "total_token": -1,
                                                                                     name: value})


HEAD_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "head-configs"
SCALED_DOWN = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=VOCAB, draft_vocab_size=40)


@pytest.mark.skipif(not HEAD_CONFIGS.is_dir(), reason=f"{HEAD_CONFIGS} not found")
@pytest.mark.parametrize("name,kind,fc_bias,kv_heads,rope_theta", [
    ("eagle3-llama3.1-8b.json", "eagle3", False, 2, 10000.0),  # no rope_theta key: 10000
    ("eagle1-llama3-8b.json", "eagle1", False, 2, 500000.0),  # bias: false
    ("eagle1-vicuna-7b.json", "eagle1", True, 4, 10000.0),  # no bias key (fc has one), no num_key_value_heads
])
def test_the_reference_head_configs_load(saved, tmp_path, name, kind, fc_bias, kv_heads, rope_theta):
    """config.json files as the EAGLE reference ships them (all say LlamaForCausalLM),
    sizes scaled down and keys kept: the kind, the fc bias, the key/value heads and
    the rotary base are read as the reference reads them, and the head drafts losslessly."""
    written = json.loads((HEAD_CONFIGS / name).read_text())
    assert written["architectures"] == ["LlamaForCausalLM"]
    config = {**written, **{key: value for key, value in SCALED_DOWN.items() if key in written}}
    meaning = {**config, "bias": fc_bias, "num_key_value_heads": kv_heads, "rope_theta": rope_theta}
    original = random_head(meaning, seed=3)
    save_head(original, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))  # the reference's spelling, not save_head's

    loaded = load_checkpoint(str(tmp_path))
    head = build_head(loaded)
    assert loaded.config.kind == kind
    assert (head.fc.bias is not None, head.config.num_key_value_heads, head.config.rope_theta) == \
        (fc_bias, kv_heads, rope_theta)
    ours, theirs = original.state_dict(), head.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    base = AutoModelForCausalLM.from_pretrained(saved / "llama").eval()
    model = EaModel(base, head, None, **TREE)
    prompt = torch.tensor([[5, 17, 3, 42, 8]])
    assert torch.equal(model.eagenerate(prompt, max_new_tokens=24), model.naivegenerate(prompt, max_new_tokens=24))
