"""Loading the base model: its `from_pretrained` options checked (or translated
from the reference's) before anything loads, and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .devices import ACCELERATORS, accelerator_place, device_problem


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
