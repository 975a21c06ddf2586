"""`ChatRunner`, which turns one request into a stream of text updates on
the one shared model, one request at a time; the options a request gives
and the errors that refuse one."""

from __future__ import annotations

import threading
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import torch

try:
    from jinja2 import TemplateError
except ImportError:  # no jinja2, no chat templates (transformers renders them with it): nothing to catch
    TemplateError = ()

from eagle_gto import EaModel, GenerationStats
from eagle_gto.chat import answer_lead, build_prompt, chat_format, encode_prompt, stop_token_ids

from .text_stream import TextStream, Update


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
