"""What the EAGLE reference engine costs per step, for a side-by-side run.

    PYTHONPATH=REF_SITE:EAGLE_CHECKOUT python -m eagle_gto.benchmarks.reference_engine [--shape llama3-8b] [--json OUT]

The reference (github.com/SafeAILab/EAGLE) ships its own modeling files and
needs transformers 4.53; it is not a dependency of this project. Put an EAGLE
checkout (its `eagle/` package) and a transformers 4.53 install (with
tokenizers 0.21 and huggingface_hub < 1.0) first on PYTHONPATH, then run
this in the same session as `engine_overhead`: same shapes, same prompt
length and token count, same timing rules, so the two tables compare
directly. This module imports nothing of the engine (it would need
transformers 5).

It builds the reference's Llama model with random weights on the device,
an EAGLE-3 head of the official shape from a config (random weights: no
draft is ever accepted, so this is cost per step), the demo base's
tokenizer (the reference's constructor loads one), and times
`naivegenerate` per token and `eagenerate` per iteration at each tree size:
(time for N new tokens - time for 1) / (steps for N - steps for 1), one
warm-up, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..cli_help import show_defaults
from ..dtype_option import auto_dtype
from .common import (add_timing_arguments, bandwidth_floors, check_output_file, check_timing_arguments, copy_bandwidth,
                     median_of, synchronize, write_json)
from .shapes import DTYPES, SHAPES, llama_config

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "demo" / "assets" / "base"


def head_config_file(shape, base_config, folder: Path) -> Path:
    """An EAGLE-3 head config as the official Llama-3.1-8B head's: one layer
    of the target's width, a draft vocabulary, no rope scaling."""
    cfg = dict(architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=shape.hidden_size,
               intermediate_size=shape.intermediate_size, num_attention_heads=shape.num_heads,
               num_key_value_heads=shape.num_kv_heads, num_hidden_layers=1, vocab_size=shape.vocab_size,
               draft_vocab_size=shape.draft_vocab_size or shape.vocab_size, target_hidden_size=shape.hidden_size,
               rms_norm_eps=1e-5, hidden_act="silu", rope_theta=getattr(base_config, "rope_theta", 10000.0),
               max_position_embeddings=base_config.max_position_embeddings, pad_token_id=None, rope_scaling=None)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def build_reference(shape, device: torch.device, dtype: torch.dtype, total_token: int, depth: int, top_k: int):
    from eagle.model.ea_model import EaModel as ReferenceModel
    from eagle.model.modeling_llama_kv import LlamaForCausalLM as ReferenceLlama

    cfg = llama_config(shape)
    if cfg.rope_scaling:  # the reference reads the older key
        cfg.rope_scaling = dict(cfg.rope_scaling, type=cfg.rope_scaling["rope_type"])
    with torch.device(device):
        base = ReferenceLlama._from_config(cfg, torch_dtype=dtype).eval()
    folder = Path(tempfile.mkdtemp(prefix="eagle-reference-"))
    config = head_config_file(shape, cfg, folder)
    # The demo tokenizer, under the class name transformers 4.53 knows.
    (folder / "tokenizer.json").write_bytes((DEMO_TOKENIZER / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    # An empty state dict: the head keeps its random initialisation (loaded with strict=False).
    return ReferenceModel(True, base, str(folder), str(config), total_token, depth, top_k, 1.0, {})


def ms_per_step(run, new_tokens: int, repeats: int, device: torch.device) -> float:
    """(time of N new tokens - time of 1) / (steps of N - steps of 1); `run(n)` returns its step count."""
    def timed(n: int):
        synchronize(device)
        start = time.perf_counter()
        steps = run(n)
        synchronize(device)
        return time.perf_counter() - start, steps

    def once() -> float:
        long_s, long_steps = timed(new_tokens)
        short_s, short_steps = timed(1)
        return 1000 * (long_s - short_s) / max(long_steps - short_steps, 1)

    return median_of(once, repeats)


# The reference's eagenerate stops once the sequence passes max_length - (its tree) - 10.
REFERENCE_STOP_MARGIN = 10


def reference_layers(num_layers: int) -> set[int]:
    """The base layers whose outputs the reference's EAGLE-3 head reads (its modeling_llama_kv)."""
    return {2, num_layers // 2, num_layers - 3}


def parse_args(argv=None) -> argparse.Namespace:
    """The options, refused (argparse's error, one line) before anything is built: engine_overhead's checks, the
    shape the reference can read, and an EAGLE checkout and transformers 4 first on the path."""
    p = argparse.ArgumentParser(prog="python -m eagle_gto.benchmarks.reference_engine",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, help="default: llama3-8b on a GPU, small on a CPU (tiny is too shallow "
                                                   "for the reference's EAGLE-3 head)")
    add_timing_arguments(p)
    p.add_argument("--json", help="write the results here")
    show_defaults(p)
    args = p.parse_args(argv)
    check_output_file(p, "--json", args.json)
    args.shape = args.shape or ("llama3-8b" if args.device.startswith("cuda") else "small")
    shape = SHAPES[args.shape]
    layers = reference_layers(shape.num_layers)
    if len(layers) < 3:  # fewer hidden states than its head's input takes
        p.error(f"--shape {args.shape}: the reference's EAGLE-3 head reads base layers 2, n/2 and n-3, which "
                f"{shape.num_layers} layers do not keep apart ({sorted(layers)}): use --shape small or llama3-8b")
    check_timing_arguments(p, args, shape.draft_vocab_size or shape.vocab_size, REFERENCE_STOP_MARGIN)
    if importlib.util.find_spec("eagle") is None:
        p.error("the EAGLE reference is not importable: put an EAGLE checkout (its eagle/ package) and "
                "transformers 4.53 first on PYTHONPATH (README: Benchmarks)")
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        p.error(f"transformers {transformers.__version__} comes first on PYTHONPATH: the reference needs 4.53 "
                "(pip install --target a folder and put it first, README: Benchmarks)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(on_gpu=device.type != "cpu")  # a random model
    sizes = args.total_tokens
    torch.manual_seed(args.seed)
    model = build_reference(shape, device, DTYPES[dtype], sizes[0], args.depth, args.top_k)
    prompt = torch.randint(0, shape.vocab_size, (1, args.prompt_length), device=device)
    floors = bandwidth_floors(model.base_model, copy_bandwidth(device, args.repeats))
    floor_ms = floors["floor_ms"]

    def steps_of(generate):
        def run(n: int) -> int:
            _, _, idx = generate(prompt, max_new_tokens=n, max_length=args.max_length, log=True)
            return idx + 1
        return run

    with torch.no_grad():
        plain = ms_per_step(steps_of(model.naivegenerate), args.new_tokens, args.repeats, device)
        iterations = {}
        for size in sizes:
            model.ea_layer.total_tokens = size - 1  # what the reference's total_token=-1 search sets
            iterations[str(size)] = ms_per_step(steps_of(model.eagenerate), args.new_tokens, args.repeats, device)
    result = dict(engine="EAGLE reference", shape=asdict(shape), device=str(device), dtype=dtype,
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  date=datetime.date.today().isoformat(), torch=torch.__version__,
                  transformers=transformers.__version__, prompt_length=args.prompt_length,
                  new_tokens=args.new_tokens, repeats=args.repeats, tree={"depth": args.depth, "top_k": args.top_k},
                  **floors, plain_ms=plain, iteration_ms=iterations)
    print(f"EAGLE reference engine, {result['device_name']}, {dtype}, transformers {transformers.__version__}, "
          f"{result['date']}: prompt {args.prompt_length}, {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| what | ms | x floor |\n|---|---|---|")
    print(f"| bandwidth floor | {floor_ms:.3f} | 1.00 |")
    print(f"| bytes a step reads (the embedding table: one row) | {floors['read_floor_ms']:.3f} | "
          f"{floors['read_floor_ms'] / floor_ms:.2f} |")
    print(f"| reference `naivegenerate`, per token | {plain:.3f} | {plain / floor_ms:.2f} |")
    for size, ms in iterations.items():
        print(f"| reference `eagenerate` total_token {size}, per iteration | {ms:.3f} | {ms / floor_ms:.2f} |")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
