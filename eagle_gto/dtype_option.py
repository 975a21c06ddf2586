"""`--dtype`: one option, and one meaning of `auto`, for every command that loads or builds a model.

auto is float32 on a CPU (half precision is slow there; float32 is also what
transformers 4, so the EAGLE reference, loaded by default). On a GPU it is the
checkpoint's own dtype, as transformers' dtype="auto" reads it from
config.json, when that is float16 or bfloat16 (Llama-3 and Qwen checkpoints
are saved in bfloat16, Vicuna's and the demo's in float16); for a float32
checkpoint, one that names none, or a benchmark's random model: bfloat16, or
float16 on a GPU without bfloat16.

Before, `python -m eagle_gto` and the servers took float16 on a GPU and
gen_answer bfloat16, so their numbers for the same model differed."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF = ("float16", "bfloat16")
DTYPE_HELP = ("weights dtype; auto: float32 on a CPU, on a GPU the checkpoint's own float16 or bfloat16 "
              "(config.json), else bfloat16 (float16 on a GPU without it)")


def add_dtype_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help=f"{DTYPE_HELP} (default: auto)")


def auto_dtype(on_gpu: bool, saved: str | None = None) -> str:
    """What auto means, given where the weights go and the dtype the checkpoint was saved in (None: not said)."""
    if not on_gpu:
        return "float32"
    if saved in HALF:
        return saved
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def saved_dtype(base_model_path: str | None) -> str | None:
    """The dtype a base model's config.json names (transformers 5 writes `dtype`, 4 `torch_dtype`; a multimodal
    model's may be in its `text_config`). None: the demo base."""
    from .model_files import read_config

    if base_model_path is None:
        from .demo import demo_paths

        base_model_path = demo_paths()[0]
    config = read_config(base_model_path)
    text_config = config.get("text_config")
    for section in (config, text_config if isinstance(text_config, dict) else {}):  # (else transformers says why)
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str):
                return section[key]
    return None


def resolve_dtype(name: str, on_gpu: bool, base_model_path: str | None) -> str:
    """The name of the dtype a command's --dtype NAME loads the base model in (auto resolved)."""
    if name == "auto":
        return auto_dtype(on_gpu, saved_dtype(base_model_path) if on_gpu else None)
    return name


def pick_dtype(name: str, on_gpu: bool, base_model_path: str | None) -> torch.dtype:
    """The torch dtype a command's --dtype NAME loads the base model in."""
    return DTYPES[resolve_dtype(name, on_gpu, base_model_path)]
