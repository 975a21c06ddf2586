"""The command line the web UI and the HTTP API share, and the model and
`ChatRunner` it loads."""

from __future__ import annotations

import argparse
import socket

import torch

from eagle_gto import EaModel
from eagle_gto.chat import MODEL_TYPES, model_type_arg
from eagle_gto.dtype_option import add_dtype_option, pick_dtype

from .chat_runner import ChatRunner

DEMO_MODEL_NAME = "eagle-gto-demo"


def build_parser(prog: str, description: str, port: int) -> argparse.ArgumentParser:
    """Model and server options; each server adds its own extras."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    model = parser.add_argument_group("model")
    model.add_argument("--base-model-path", help="base model: local folder or hub id (default: the demo pair)")
    model.add_argument("--ea-model-path", help="draft head: local folder or hub id (default: the demo pair)")
    model.add_argument("--model-type", type=model_type_arg, choices=MODEL_TYPES, default="auto",
                       help="chat template; auto: the tokenizer's own, else plain text (default: auto)")
    model.add_argument("--system", help="system prompt for conversations that send none (default: none; the "
                                        "format's own where it has one)")
    model.add_argument("--total-token", type=int, default=60,
                       help="draft tree size: nodes verified per step, -1 picks one (default: 60)")
    model.add_argument("--depth", type=int, default=7, help="draft tree depth (default: 7)")
    model.add_argument("--top-k", type=int, default=10, help="draft tree branching per level (default: 10)")
    add_dtype_option(model)
    model.add_argument("--device-map", "--device", help='accelerate device map, e.g. "auto", "cuda:0", "cpu" or '
                                                      '"none"; --device is the same option, as gen_answer names it '
                                                      '(default: "auto" on CUDA, none on CPU)')
    model.add_argument("--max-new-tokens", type=int, default=512,
                       help="most tokens one answer may have (default: 512)")
    model.add_argument("--max-length", type=int,
                       help="context: prompt + answer, in tokens (default: 2048, or the base model's sliding "
                            "window or max_position_embeddings if smaller)")
    quantize = model.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-8bit", action="store_true", help="8-bit base model weights (bitsandbytes)")
    quantize.add_argument("--load-in-4bit", action="store_true", help="4-bit base model weights (bitsandbytes)")
    model.add_argument("--no-eagle3", action="store_true",
                       help="the head must be EAGLE-1/2 (the head type is read from the checkpoint anyway)")
    model.add_argument("--no-cuda-graphs", action="store_true",
                       help="launch decoding steps op by op instead of replaying CUDA graphs (default: graphs on "
                            "a single GPU)")
    model.add_argument("--torch-compile", nargs="?", const="default", choices=("default", "max-autotune-no-cudagraphs"),
                       help="torch.compile the engine (GPU), in this mode (default mode: default): faster steps "
                            "after about a minute of compilation at startup (default: off)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    server.add_argument("--port", type=port_number, default=port, help=f"port (default: {port})")
    return parser


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text}")
    return port


def check_address(parser: argparse.ArgumentParser, host: str, port: int) -> None:
    """Ends the program when the server could not listen on host:port (taken, or an unknown host), before the
    model loads (minutes, for a large one) rather than after."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:  # socket.gaierror included
        parser.exit(2, f"{parser.prog}: error: cannot listen on {host}:{port}: {err}\n")


def load_model(args: argparse.Namespace) -> EaModel:
    cuda = torch.cuda.is_available()
    device_map = args.device_map or ("auto" if cuda else "none")
    on_cuda = cuda and device_map not in ("none", "cpu")  # where the weights go: half precision is slow on a CPU
    options = {"dtype": pick_dtype(args.dtype, on_cuda, args.base_model_path), "load_in_8bit": args.load_in_8bit,
               "load_in_4bit": args.load_in_4bit}
    if device_map != "none":
        options["device_map"] = device_map
    return EaModel.from_pretrained(args.base_model_path, args.ea_model_path, total_token=args.total_token,
                                   depth=args.depth, top_k=args.top_k, use_eagle3=False if args.no_eagle3 else None,
                                   cuda_graphs=False if args.no_cuda_graphs else None,
                                   torch_compile=args.torch_compile or False, **options)


def load_runner(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ChatRunner:
    """The model behind a `ChatRunner`. Options it cannot serve requests with end the program here, with an
    error message, rather than fail every request."""
    for option, tokens in (("--max-new-tokens", args.max_new_tokens), ("--max-length", args.max_length)):
        if tokens is not None and tokens < 1:
            parser.error(f"{option} must be a positive number of tokens, got {tokens}")
    if (args.base_model_path is None) != (args.ea_model_path is None):
        parser.error("give both --base-model-path and --ea-model-path, or neither for the demo pair")
    try:
        runner = ChatRunner(load_model(args), args.model_type, args.max_length, args.system)
    except ValueError as err:  # eagle_gto.CheckpointError (a wrong path) among others: one line, no usage
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    try:
        runner.make_caches()
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        parser.exit(2, f"{parser.prog}: error: the caches of a context of {runner.max_length} tokens (--max-length) "
                       f"do not fit in memory: {str(err).splitlines()[0]}\n")
    if runner.model.cuda_graphs or runner.model.torch_compile:
        print("preparing the decoding steps (CUDA graphs, compilation) before the first request...", flush=True)
    runner.warm_up()
    return runner


def model_name(args: argparse.Namespace) -> str:
    """The id clients name the model by: the base model's path or hub id."""
    return args.base_model_path or DEMO_MODEL_NAME
