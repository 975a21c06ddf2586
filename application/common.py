"""What the web UI and the HTTP API share: the command line, model loading,
stop strings over streamed text (`StopStrings`) and `ChatRunner`, which
turns one request into a stream of text updates on the one shared model,
one request at a time."""

from __future__ import annotations

import argparse
import socket
import threading
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Iterator

import torch

try:
    from jinja2 import TemplateError
except ImportError:  # no jinja2, no chat templates (transformers renders them with it): nothing to catch
    TemplateError = ()

from eagle_gto import EaModel, GenerationStats, Step
from eagle_gto.chat import (MODEL_TYPES, answer_lead, build_prompt, chat_format, decode_after, decode_context,
                            encode_prompt, model_type_arg, stop_token_ids)
from eagle_gto.dtype_option import add_dtype_option, pick_dtype

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


class ContextLengthError(ValueError):
    """The prompt leaves no room in the context for an answer."""


class ChatTemplateError(ValueError):
    """The model's chat template refuses the conversation (its own message)."""


class InvalidTextError(ValueError):
    """Text that is not Unicode (a lone surrogate): the user's to fix, not a failure of the model."""


# OpenAI's top_p 0 keeps only the most probable token; the engine reads 0 as
# "off", but any top_p below the top token's probability (>= 1/vocabulary) does that.
TOP_TOKEN_ONLY = 1e-9

# Tokenizing costs seconds and about half a gigabyte per megabyte of text, so a prompt far longer than the
# context is refused from the tokens of its first TOO_LONG_CHARS_PER_TOKEN * max_length characters (a token is a
# few characters) instead of being tokenized whole first: a 100 MB body would have run the server out of memory.
TOO_LONG_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off; 0: the most probable token only
    speculative: bool = True  # False: plain decoding through the same loop
    seed: int | None = None


@dataclass
class Update:
    """One iteration's new text. `pieces` split it by origin: True where the
    text comes from accepted draft tokens, False where the target produced
    the token itself (the bonus token, or every token in plain decoding)."""

    pieces: list[tuple[str, bool]]
    step: Step
    stats: GenerationStats  # the whole generation so far

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)


Pieces = list[tuple[str, bool]]  # text by origin, as in `Update.pieces`


class HeldText:
    """Text held back by origin, so that each part is sent later with its own
    piece's origin rather than with that of the piece that releases it."""

    def __init__(self):
        self.pieces: Pieces = []

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def hold(self, pieces: Pieces) -> None:
        self.pieces += [piece for piece in pieces if piece[0]]

    def release(self, chars: int) -> Pieces:
        """The first `chars` characters held, no longer held."""
        out = []
        while chars > 0 and self.pieces:
            text, drafted = self.pieces[0]
            out.append((text[:chars], drafted))
            self.pieces[0] = (text[chars:], drafted)
            if len(text) <= chars:
                self.pieces.pop(0)
            chars -= len(text)
        return out


class TextStream:
    """Incremental detokenization. A token may end inside a character (byte
    level BPE), which decodes to U+FFFD until the rest arrives, so such text
    is held back (the whole characters before it are not); and each new text is decoded after the tokens before it (at
    first, the prompt's last ones: `context`), as SentencePiece decoders drop
    the space before a text's first word. `lead`, where the text starts with
    it, is left out (see `ChatRunner.generate`)."""

    def __init__(self, tokenizer, lead: str = "", context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = decode_context(tokenizer, list(context))
        self.start = 0  # ids[start:read] were emitted last time: the context for the next text
        self.read = len(self.ids)
        self.sent = 0  # characters of ids[read:]'s text sent already: those before a character not yet whole
        self.lead = lead
        self.held = HeldText()  # the first text, while it may still be (the start of) the lead

    def add(self, ids: list[int], final: bool = False) -> str:
        return "".join(text for text, _ in self.add_piece(ids, False, final))

    def add_piece(self, ids: list[int], drafted: bool, final: bool = False) -> Pieces:
        """The new text of `ids`, which come from accepted drafts or not; held text goes with its own origin."""
        if not ids and not final:
            return []
        self.ids += ids
        text = decode_after(self.tokenizer, self.ids[self.start:self.read], self.ids[self.read:])
        if text.endswith("\ufffd") and not final:  # the text up to the last whole character goes now, by origin;
            whole = text.rstrip("\ufffd")[self.sent:]  # the cut one with the piece that completes it
            self.sent += len(whole)
            return self._without_lead([(whole, drafted)] if whole else [], final)
        text, self.sent = text[self.sent:], 0
        self.start, self.read = self.read, len(self.ids)
        return self._without_lead([(text, drafted)] if text else [], final)

    def _without_lead(self, pieces: Pieces, final: bool) -> Pieces:
        if not self.lead:
            return pieces
        self.held.hold(pieces)
        text = self.held.text
        if len(text) < len(self.lead) and self.lead.startswith(text) and not final:
            return []
        if text.startswith(self.lead):
            self.held.release(len(self.lead))
        self.lead = ""
        return self.held.release(len(text))


def fallbacks(stop: str) -> list[int]:
    """Knuth-Morris-Pratt's failure function: for each start of `stop`, the
    length of its longest proper end that is a start of `stop` too."""
    out, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = out[k - 1]
        k += stop[i] == stop[k]
        out[i] = k
    return out


class StopStrings:
    """Cuts the answer before the stop string that is complete first (the one
    plain decoding would meet first, however many tokens a step brings). Text
    that might be the start of one is held back until the next text shows it
    is not."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fallbacks = [fallbacks(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop string: the most of its start the text ends with
        self.text = ""
        self.sent = 0
        self.end: int | None = None  # where the stop string that was hit ends in the text
        self.held = HeldText()  # the text not sent yet, by origin (`feed_pieces`)

    @property
    def hit(self) -> bool:
        return self.end is not None

    def feed(self, new: str) -> str:
        """The text that can be sent now. Each stop string is matched as a
        Knuth-Morris-Pratt automaton, in time linear in the text: testing each
        possible start at the end of the text took time quadratic in a long
        held run (a long stop string of spaces, over indented code)."""
        if self.hit:
            return ""
        start = len(self.text)
        self.text += new
        found = []
        for n, stop in enumerate(self.stops):
            matched, fallback = self.matched[n], self.fallbacks[n]
            for i, char in enumerate(new, start + 1):
                while matched and stop[matched] != char:
                    matched = fallback[matched - 1]
                matched += stop[matched] == char
                if matched == len(stop):
                    found.append((i, i - matched))
                    break
            self.matched[n] = matched
        if found:
            self.end, cut = min(found)
            return self._send(cut)
        # The longest end of the text that may start a stop string is held (the text before it cannot).
        return self._send(len(self.text) - max(self.matched, default=0))

    def flush(self) -> str:
        return self._send(len(self.text))

    def feed_pieces(self, pieces: Pieces) -> Pieces:
        """`feed` by origin: the text sent, each part with the origin of the piece it came with."""
        sent = []
        for text, drafted in pieces:
            if not self.hit:
                self.held.hold([(text, drafted)])
                sent += self.held.release(len(self.feed(text)))
        return sent

    def flush_pieces(self) -> Pieces:
        return self.held.release(len(self.flush()))

    def _send(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def until_stop(stats: GenerationStats, text: TextStream, chars: int) -> GenerationStats:
    """`stats` as if decoding had stopped at the token that completes the stop
    string, which ends `chars` characters into the answer (as `text`, a new
    stream, decodes it: the answer's own decoding, so character counts agree).
    Counted token by token: a step may end inside a character, whose text
    comes with the next step's first token. The tokens after it do not count,
    so usage is the same in both modes: the tokens up to and including the
    one completing the stop string."""
    tokens = [t for step in stats.steps for t in step.tokens]
    length = count = 0
    while length < chars and count < len(tokens):
        length += len(text.add([tokens[count]]))
        count += 1
    steps = []
    for step in stats.steps:
        keep = min(count, len(step.tokens))
        steps.append(replace(step, tokens=step.tokens[:keep], num_accepted=min(step.num_accepted, keep)))
        count -= keep
        if count == 0:
            break
    steps[-1] = replace(steps[-1], finish_reason="stop")
    return GenerationStats(stats.prompt_length, steps)


def check_text(text: str) -> None:
    """Text a tokenizer can encode: JSON may carry a lone surrogate (a client
    that cut a string inside an emoji), which is not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidTextError(f"the text holds a lone surrogate {text[err.start]!r} at character {err.start}, "
                         "which is not valid Unicode") from None


class ChatRunner:
    """Prompts in, text out, on one shared model. Generations never
    interleave: the model's caches are shared, so each generation holds a
    lock from its first step until it ends or its iterator is closed."""

    def __init__(self, model: EaModel, model_type: str = "auto", max_length: int | None = None,
                 system: str | None = None):
        if model.tokenizer is None:
            raise ValueError("the base model has no tokenizer; the servers need one to turn text into tokens")
        max_length = max_length or model.default_max_length()
        model.check_max_length(max_length)  # e.g. a sliding-window model's window: at startup, not per request
        self.model = model
        self.tokenizer = model.tokenizer
        self.model_type = model_type
        self.max_length = max_length
        self.system = system  # for conversations that send none (a system message wins)
        template = bool(getattr(self.tokenizer, "chat_template", None))
        self.plain_text = model_type == "plain" or (model_type == "auto" and not template)
        self.is_llama3 = chat_format(model_type).is_llama3
        # checked against the model's rows: at startup, not by refusing every request
        self.stop_token_ids = stop_token_ids(self.tokenizer, model_type, model.vocab_size)
        # The format's end of turn as text (qwen's <|im_end|>, which a tokenizer without it as one token writes
        # so): a chat answer ends before it, as gen_answer's and the CLI's do (chat.answer_text).
        self.stop_strings = chat_format(model_type).stop_strings
        try:
            self.answer_lead = answer_lead(model_type, self.tokenizer, system)
        except TemplateError:  # a template that refuses a one-question conversation: nothing to leave out
            self.answer_lead = ""
        self._lock = threading.Lock()

    @property
    def longest_answer(self) -> int:
        """The most new tokens the context allows (a prompt holds at least one token)."""
        return self.max_length - 1

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def make_caches(self) -> None:
        """Makes the model's caches for the whole context now (the first request would), so that a context
        too large for the memory is found at startup; they are kept for every request."""
        self.model.naivegenerate(torch.tensor([[0]]), max_new_tokens=1, max_length=self.max_length)

    def warm_up(self) -> int:
        """Prepare every step shape of greedy requests, speculative and plain,
        up to the context (`EaModel.warm_up`), so that no request records a
        CUDA graph or waits for compilation; sampled requests record their
        own graphs (a few milliseconds each), the compiled code is shared."""
        return sum(self.model.warm_up(max_length=self.max_length, speculative=speculative)
                   for speculative in (True, False))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        for message in messages:
            check_text(message["content"])
        try:
            text = build_prompt(messages, self.model_type, self.tokenizer, system=self.system)
        except TemplateError as err:  # e.g. Mixtral's and Llama-2's raise_exception on roles that do not alternate
            raise ChatTemplateError(f"the model's chat template refuses these messages: {err}") from err
        return self._encode(text, lambda part: encode_prompt(part, self.tokenizer, self.model_type))

    def text_prompt(self, text: str) -> list[int]:
        check_text(text)
        return self._encode(text, lambda part: self.tokenizer(part).input_ids)

    def _encode(self, text: str, encode) -> list[int]:
        """`encode(text)`, unless the text's start alone has twice the tokens the context holds (twice: a text cut
        inside a word may have a token or so more than its whole)."""
        start = text[:TOO_LONG_CHARS_PER_TOKEN * self.max_length]
        if len(start) < len(text) and len(encode(start)) > 2 * self.max_length:
            raise ContextLengthError(f"the prompt has more than {2 * self.max_length} tokens, too many for the "
                                     f"context of {self.max_length} tokens; shorten it or clear the conversation")
        return encode(text)

    def check_fits(self, prompt_ids: list[int]) -> None:
        """The engine's rule, in both modes: the prompt and one new token must fit in the context."""
        if len(prompt_ids) + 1 > self.max_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens, too many for the context of {self.max_length} tokens "
                "(one more is needed for the answer); shorten it or clear the conversation"
            )

    def text_stream(self, prompt_ids: list[int], chat: bool = False) -> TextStream:
        """The answer's text as it comes: decoded after the prompt; for a chat, without the format's lead."""
        return TextStream(self.tokenizer, self.answer_lead if chat else "", prompt_ids)

    def generate(self, prompt_ids: list[int], options: GenerationOptions, chat: bool = False) -> Iterator[Update]:
        """One `Update` per iteration; the last one's step is finished. Close
        the iterator to stop early: that frees the model for the next request.

        `chat`: the prompt is a `chat_prompt`, and the text an assistant turn,
        without the space the format writes before an answer (vicuna's
        `ASSISTANT: `, `[/INST] `). Decoded after the prompt, the model's
        " yes" comes with that space, and the next turn's prompt would write it twice."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.check_fits(prompt_ids)
        generator = None
        if options.seed is not None:
            device = self.model.base_model.get_output_embeddings().weight.device  # where sampling happens
            generator = torch.Generator(device=device).manual_seed(options.seed)
        with self._lock:
            steps = self.model.generate_steps(
                torch.tensor([prompt_ids]), temperature=options.temperature, top_p=options.top_p or TOP_TOKEN_ONLY,
                max_new_tokens=options.max_new_tokens, max_length=self.max_length, is_llama3=self.is_llama3,
                stop_token_ids=self.stop_token_ids, speculative=options.speculative, generator=generator)
            text = self.text_stream(prompt_ids, chat)
            stats = GenerationStats(prompt_length=len(prompt_ids))
            with closing(steps):
                for step in steps:
                    stats.steps.append(step)
                    drafted = step.tokens[:step.num_accepted]
                    pieces = text.add_piece(drafted, True) + text.add_piece(step.tokens[len(drafted):], False,
                                                                            step.finished)
                    yield Update(pieces, step, stats)
