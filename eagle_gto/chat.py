"""Conversation prompts per model type, shared by the web UI, the HTTP API,
the benchmarks and the trainer.

`--model-type` names follow the EAGLE reference (vicuna, llama2-chat, llama3,
qwen, mixtral; its web UI's spellings llama-2-chat and llama-3-instruct are
taken too; llama3 is the tokenizer's template where it has one) plus `auto`
(the tokenizer's own chat template, falling back to `plain`) and `plain`
(turns joined as text, for base/code models such as the demo pair).
"""

from __future__ import annotations

from dataclasses import dataclass

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Llama-2 chat's own default, which the reference's web UI and evaluation scripts pass in full.
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)


@dataclass(frozen=True)
class ChatFormat:
    """How one model type writes a conversation."""

    is_llama3: bool = False  # stop at <|eot_id|> as the reference does
    stop_strings: tuple[str, ...] = ()


MODEL_TYPES = ("auto", "plain", "vicuna", "llama2-chat", "llama3", "qwen", "mixtral")
MODEL_TYPE_ALIASES = {"llama-2-chat": "llama2-chat", "llama-3-instruct": "llama3"}  # the reference web UI's names


def model_type_arg(name: str) -> str:
    """`--model-type` as command lines give it (argparse `type=`, before its `choices` check):
    the reference web UI's names become this project's, so its command lines keep working."""
    return MODEL_TYPE_ALIASES.get(name, name)


@dataclass(frozen=True)
class Template:
    """A conversation as header + one piece per turn + the generation prompt;
    `{system}` in the header is filled with the system prompt (or the
    template's default)."""

    header: str
    user: str
    assistant: str
    generation_prompt: str = ""  # what opens the next assistant turn
    default_system: str = ""

    def render(self, turns, system, generation_prompt=True):
        text = self.header.format(system=system or self.default_system)
        for m in turns:
            text += (self.user if m["role"] == "user" else self.assistant).format(m["content"])
        return text + self.generation_prompt if generation_prompt else text


def _llama2(turns, system, generation_prompt=True):  # the answer follows [/INST] directly
    # Llama-2 chat puts the system prompt inside the first user turn.
    text, first = "", True
    for m in turns:
        if m["role"] == "user":
            content = m["content"]
            if first:
                content = f"<<SYS>>\n{system or LLAMA2_SYSTEM}\n<</SYS>>\n\n{content}"
                first = False
            text += f"<s>[INST] {content} [/INST]"
        else:
            text += f" {m['content']} </s>"
    return text


def _llama3(turns, system, generation_prompt=True):
    header = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    return Template("<|begin_of_text|>" + header.replace("{", "{{").replace("}", "}}"),
                    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                    "<|start_header_id|>assistant<|end_header_id|>\n\n{}<|eot_id|>",
                    "<|start_header_id|>assistant<|end_header_id|>\n\n").render(turns, None, generation_prompt)


_TEMPLATES = {
    "vicuna": Template("{system} ", "USER: {} ASSISTANT:", " {}</s>", default_system=VICUNA_SYSTEM).render,
    "llama2-chat": _llama2,
    "llama3": _llama3,
    "qwen": Template("<|im_start|>system\n{system}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n",
                     "<|im_start|>assistant\n{}<|im_end|>\n", "<|im_start|>assistant\n",
                     default_system="You are a helpful assistant.").render,
    "mixtral": Template("<s>", "[INST] {} [/INST]", " {}</s>").render,
    # A base/code model continues text: the conversation is its turns in order.
    "plain": Template("", "{}", "{}\n\n").render,
}
# Qwen stops where FastChat's qwen-7b-chat does: at its end of turn, and at a new turn or the end of text
# that a model writes without closing its own turn first.
FORMATS = {"llama3": ChatFormat(is_llama3=True),
           "qwen": ChatFormat(stop_strings=("<|im_end|>", "<|im_start|>", "<|endoftext|>"))}
# Formats with no place for a system prompt: it opens the first user turn (as Mistral's own template does).
SYSTEM_IN_FIRST_TURN = ("mixtral", "plain")
# Formats where only a user turn opens an assistant turn (vicuna's `ASSISTANT:`, `[/INST]`), and where Llama-2
# chat writes the system prompt: a conversation with no user turn gets an empty one first.
USER_TURN_OPENS_ANSWER = ("vicuna", "llama2-chat", "mixtral")


def build_prompt(messages: list[dict], model_type: str = "auto", tokenizer=None, system: str | None = None,
                 generation_prompt: bool = True) -> str:
    """Text that asks the model for the next assistant turn (with
    `generation_prompt=False`: the conversation alone, as training reads it).
    `messages` are {"role": "user"|"assistant"|"system", "content": str}
    dicts; `system` is the system prompt for a conversation that has none
    (several system messages are joined)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; choose from {', '.join(MODEL_TYPES)}")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or system
    turns = [m for m in messages if m["role"] != "system"]
    template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    # llama3 too, as the reference's Llama-3 scripts: the template trims the turns, and Llama-3.1's writes a system
    # turn with its date lines; Llama-3's format is written out for a tokenizer without one.
    if template and model_type in ("auto", "llama3"):
        full = ([{"role": "system", "content": system}] if system else []) + turns
        return tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=generation_prompt)
    if model_type == "auto":
        model_type = "plain"
    if system and model_type in SYSTEM_IN_FIRST_TURN:
        first = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
        turns = list(turns)
        if first is None:  # no user turn to open: the system prompt is the first one
            turns.insert(0, {"role": "user", "content": system})
        else:
            turns[first] = {"role": "user", "content": f"{system}\n\n{turns[first]['content']}"}
    if model_type in USER_TURN_OPENS_ANSWER and not any(m["role"] == "user" for m in turns):
        turns = [{"role": "user", "content": ""}] + turns
    return _TEMPLATES[model_type](turns, system, generation_prompt)


def answer_lead(model_type: str = "auto", tokenizer=None, system: str | None = None) -> str:
    """What the format writes between the prompt and an assistant answer's
    text (" " after vicuna's `ASSISTANT:` and mixtral's and llama2-chat's
    `[/INST]`, "" for llama3 and qwen, and for a chat template whose written
    answer turn does not begin with the prompt that asks for it). A model's own
    answer begins with it, so text decoded from the answer's tokens may carry it already."""
    marker = "\ue000"  # (a private-use character: in no template)
    user = [{"role": "user", "content": "?"}]
    prompt = build_prompt(user, model_type, tokenizer, system)
    full = build_prompt(user + [{"role": "assistant", "content": marker}], model_type, tokenizer, system,
                        generation_prompt=False)
    end = full.find(marker, len(prompt))
    return full[len(prompt):end] if full.startswith(prompt) and end >= 0 else ""


# Prompt tokens an answer is decoded after (`decode_after`): the last one would do for SentencePiece's rule.
DECODE_CONTEXT = 4


def decode_context(tokenizer, prompt_ids: list[int]) -> list[int]:
    """The prompt's last DECODE_CONTEXT tokens that decode to text: special
    tokens, left out in decoding, would leave a SentencePiece decoder none."""
    context: list[int] = []
    for token in reversed(prompt_ids):
        if tokenizer.decode([token], skip_special_tokens=True):
            context.insert(0, token)
            if len(context) == DECODE_CONTEXT:
                break
    return context


def decode_after(tokenizer, context: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context`. Decoded together: a SentencePiece
    decoder drops the space before a text's first word, so "▁yes" alone
    decodes to "yes", after "ASSISTANT:" to " yes" (as a byte-level one does).
    Without transformers' clean-up of spaces before punctuation, which would
    reach across the seam and shorten the context's text."""
    options = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    before = tokenizer.decode(list(context), **options)
    return tokenizer.decode(list(context) + list(ids), **options)[len(before):]


def answer_text(tokenizer, prompt_ids: list[int], answer_ids: list[int], lead: str = "",
                stop_strings: tuple[str, ...] = ()) -> str:
    """An assistant turn's text as the conversation keeps it: decoded after
    its prompt, cut before the first stop string, and without `lead`
    (`answer_lead`: the format writes it before every answer, so the next
    turn's prompt holds the tokens the model wrote, not the space twice)."""
    text = decode_after(tokenizer, decode_context(tokenizer, prompt_ids), answer_ids)
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text.removeprefix(lead)


def chat_format(model_type: str) -> ChatFormat:
    return FORMATS.get(model_type, ChatFormat())


def stop_token_ids(tokenizer, model_type: str, vocab_size: int | None = None) -> list[int]:
    """Ids of the format's stop strings that are single tokens of this
    tokenizer (e.g. Qwen's <|im_end|>), for the engine's `stop_token_ids`;
    the engine adds the model's eos ids itself, and <|eot_id|> with `is_llama3`.
    With the model's `vocab_size`, ids past it are refused (ValueError): the
    engine would refuse every generation, so callers check once, at startup."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[s] for s in chat_format(model_type).stop_strings if s in vocab]
    outside = [i for i in ids if vocab_size is not None and not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"the {model_type} format's stop token ids {outside} lie outside the model's vocabulary "
                         f"[0, {vocab_size}): is the tokenizer this model's?")
    return ids


def eos_ids(*sources) -> set[int]:
    """The eos ids `sources` set (a generation_config, a model config, a
    tokenizer: each None, one id or a list of ids)."""
    ids: set[int] = set()
    for source in sources:
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return ids


def written_bos(text: str, tokenizer, model_type: str) -> int:
    """Characters of the <s> a llama2-chat or mixtral prompt opens with, which
    `encode_prompt` gives as the tokenizer's BOS id, the rest tokenized as a
    text's start (0 where there is none, or the tokenizer has no BOS)."""
    bos = getattr(tokenizer, "bos_token", None)
    if model_type in ("llama2-chat", "mixtral") and bos and getattr(tokenizer, "bos_token_id", None) is not None:
        return len(bos) if text.startswith(bos) else 0
    return 0


def encode_prompt(text: str, tokenizer, model_type: str = "auto") -> list[int]:
    """Token ids of a prompt. Templates that write their own <s>/BOS must not
    get a second one from the tokenizer."""
    skip = written_bos(text, tokenizer, model_type)
    if skip:
        # The reference's text has no <s>: its tokenizer adds the BOS and reads "[INST]" as a text's start ("▁[").
        # Tokenized after a written <s>, a SentencePiece tokenizer without the legacy space would read "[".
        return [tokenizer.bos_token_id] + tokenizer(text[skip:], add_special_tokens=False).input_ids
    writes_bos = model_type in ("llama2-chat", "llama3", "mixtral") or (
        model_type == "auto" and getattr(tokenizer, "chat_template", None)
    )
    return tokenizer(text, add_special_tokens=not writes_bos).input_ids
