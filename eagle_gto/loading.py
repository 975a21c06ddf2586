"""Loading the base model: its `from_pretrained` options checked (or translated
from the reference's) before anything loads, the model, and its tokenizer.

The base model is loaded by transformers (`load_base`), but refused here when
its weights do not all load (transformers would leave missing tensors random
with only a logged report), with the folder or file named."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import looks_like_head
from .devices import ACCELERATORS, accelerator_place, device_problem
from .model_files import CheckpointError, expand_path, hub_options, not_weights, read_config, resolve_file, short_list


def check_device_map(device_map) -> None:
    """A device map that names CUDA, XPU or MPS where there is none, or a device there is not, would fail deep in
    torch (an AssertionError, or part-way through loading); one that offloads by name ("disk", "meta") was
    refused only once the rest of the base had loaded (minutes for a large one)."""
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    offloaded = sorted({str(t) for t in targets if str(t) in ("disk", "meta")})
    if offloaded:
        raise ValueError(f"device_map places weights on {' and '.join(map(repr, offloaded))}: the engine needs every "
                         "weight in the memory of the device that runs it; map those modules to a device")
    for target in targets:
        problem = device_problem(target)
        if problem:
            name = ACCELERATORS[accelerator_place(target)[0]][0]
            raise ValueError(f"device_map={device_map!r} places the model on {name}, but {problem}")


def quantization_options(kwargs: dict) -> None:
    """The reference's `load_in_8bit`/`load_in_4bit` arguments (its web UI passes them, False by
    default), which transformers 5 no longer takes: True becomes a bitsandbytes `quantization_config`."""
    eight, four = bool(kwargs.pop("load_in_8bit", False)), bool(kwargs.pop("load_in_4bit", False))
    if not (eight or four):
        return
    if eight and four:
        raise ValueError("give load_in_8bit or load_in_4bit, not both")
    if kwargs.get("quantization_config") is not None:
        raise ValueError("give load_in_8bit/load_in_4bit or quantization_config, not both")
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=eight, load_in_4bit=four)


def check_dtype(dtype) -> None:
    """A dtype as transformers takes it: a torch.dtype, its name, or "auto"."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return
    if not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        raise ValueError(f"torch_dtype={dtype!r} is not a torch dtype (e.g. torch.bfloat16, 'float16', 'auto')")


def read_base_config(path_or_id: str, hub: dict | None = None) -> dict:
    cfg = read_config(path_or_id, hub)
    if looks_like_head(cfg):
        raise CheckpointError(f"{path_or_id}: config.json describes an EAGLE draft head, not a base model "
                              "(are base_model_path and ea_model_path swapped?)")
    _check_generation_config(path_or_id, hub)
    return cfg


def _check_generation_config(path_or_id: str, hub: dict | None) -> None:
    """A local base's generation_config.json must read: transformers takes one that does not for a missing
    one (with an info log line), and the eos ids it lists would then not stop generation."""
    file = Path(expand_path(path_or_id)) / (hub or {}).get("subfolder", "") / "generation_config.json"
    if file.is_dir():  # (transformers passes over it as over a missing one)
        raise CheckpointError(f"{file}: a folder, not a generation config")
    if not file.is_file():
        return
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); transformers would ignore it, and the stop "
                              "token ids it lists with it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")


def load_base(path_or_id: str, **kwargs):
    """The base model by transformers' `AutoModelForCausalLM.from_pretrained`
    (kwargs go there). transformers only logs the tensors a checkpoint lacks
    (they stay random), drops tensors config.json has no place for, and raises
    bare errors for a corrupt file or shapes that contradict config.json; here
    each is a CheckpointError naming the folder or file."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path_or_id = expand_path(path_or_id)
    read_base_config(path_or_id, hub_options(kwargs))  # a clear error for a wrong path or a head
    _check_local_weight_files(path_or_id, kwargs.get("subfolder"))
    keep_mismatched = kwargs.pop("ignore_mismatched_sizes", False)  # the caller's explicit choice to reinitialise
    try:
        base, info = AutoModelForCausalLM.from_pretrained(path_or_id, output_loading_info=True,
                                                          ignore_mismatched_sizes=True, **kwargs)
    except SafetensorError as err:
        file = _unreadable_safetensors(path_or_id, hub_options(kwargs))
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    except (torch.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # corrupt pickles, bad index files, config values transformers refuses, ...
        raise CheckpointError(f"{path_or_id}: cannot load the base model: {type(err).__name__}: {err}") from None
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing tensors, which would stay random: {short_list(info['missing_keys'])}")
    if info["mismatched_keys"] and not keep_mismatched:
        shapes = [f"{key} {list(found)} where config.json implies {list(expected)}"
                  for key, found, expected in info["mismatched_keys"]]
        problems.append(f"tensors of the wrong shape: {short_list(shapes)}")
    unexpected = info["unexpected_keys"]
    dropped = [k for k in unexpected if ".layers." in f".{k}" and not k.endswith("inv_freq")]
    if dropped:  # e.g. more decoder layers, or q/k norms, than config.json describes: they would be ignored
        problems.append(f"decoder-layer tensors config.json has no place for (ignored by transformers): "
                        f"{short_list(dropped)}")
    if problems:
        if unexpected and not dropped:  # often the reason: the weights of another model
            problems.append(f"unexpected tensors: {short_list(unexpected)}")
        hint = " (they look like an EAGLE draft head's: are base_model_path and ea_model_path swapped?)"
        raise CheckpointError(f"{path_or_id}: the weights do not fit config.json: " + "; ".join(problems)
                              + (hint if looks_like_head({}, unexpected) else ""))
    check_not_offloaded(base, path_or_id)
    return base


def check_not_offloaded(base, name: str) -> None:
    """Weights accelerate offloaded (to disk, or to the CPU beside GPUs) sit on the meta device between forwards;
    the engine reads weights and their devices directly (the head's place and embedding, the caches, EAGLE-1's
    lm_head), which fails mid-generation on them, or moves a head to meta, losing its weights."""
    offloaded = sorted({key for key, p in list(base.named_parameters()) + list(base.named_buffers())
                        if p.device.type == "meta"})
    if offloaded:
        raise CheckpointError(f"{name}: device_map left weights offloaded, on disk or unloaded "
                              f"({short_list(offloaded)}); accelerate offloads a 'cpu' entry beside GPUs too. The "
                              "engine needs every weight in the memory of the device that runs it (give max_memory "
                              "more room, or another device_map)")


def _check_local_weight_files(path_or_id, subfolder=None) -> None:
    """A local folder's weight files that are LFS pointers or empty, named
    before transformers fails on them with an unpickling error."""
    folder = Path(path_or_id) / (subfolder or "")
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        if file.is_dir():
            raise CheckpointError(f"{file}: a folder, not a weights file")
        instead = not_weights(file)
        if instead:
            raise CheckpointError(f"{file}: {instead}")


def _unreadable_safetensors(path_or_id: str, hub: dict) -> str:
    """The first .safetensors file of the model's folder whose header does not read (else the folder)."""
    from safetensors import safe_open

    folder = resolve_file(path_or_id, "config.json", hub=hub).parent  # (read before: it exists)
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception:  # SafetensorError, OSError: this is the file
            return str(file)
    return str(folder)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def trusted(kwargs: dict) -> dict:
    return {"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}


def load_tokenizer(base_model_path, hub: dict):
    """The base model's tokenizer, or None for a base saved without one (it
    still generates from token ids). Tokenizer files that do not load are an error."""
    from transformers import AutoTokenizer

    folder = Path(base_model_path) / hub.get("subfolder", "")
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if folder.is_dir() and not present:
        # Not even tried: for some architectures (Qwen2/3) transformers builds an
        # empty tokenizer from nothing, whose EOS id 0 would then stop generation.
        return None
    options = {k: v for k, v in hub.items() if k != "subfolder"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model_path, subfolder=hub.get("subfolder", ""), **options)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        if present:
            raise CheckpointError(f"{folder}: the tokenizer ({', '.join(present)}) does not load: "
                                  f"{type(err).__name__}: {err}") from None
        return None
    if len(tokenizer) <= 1:  # the same empty tokenizer, for a hub repository without tokenizer files
        return None
    return tokenizer
