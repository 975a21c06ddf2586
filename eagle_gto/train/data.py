"""Training data: jsonl records -> token ids with a loss mask.

One JSON object a line, any of:
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- OpenAI:   {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
- plain text: {"text": ...}

Conversations are written with `eagle_gto.chat.build_prompt` for the chosen
model type (the tokenizer's chat template with `auto`), so training sees
exactly the prompts the engine builds at inference. Only the assistant's
tokens carry loss (with the whitespace the template writes around an answer
and the special end-of-turn token after it, so the head learns where answers
stop); plain text is all loss. Which tokens are assistant tokens is found
from character offsets: each answer is looked up in the text after the
prompt that asks for it, which works for any template that copies the
answer text verbatim. Assistant turns before the first user turn are
dropped, as the EAGLE reference does: nothing asks for them.

`regenerate` replaces the assistant answers by the base model's own greedy
answers: a head trained on what its target actually writes accepts more.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from jinja2 import TemplateError
except ImportError:  # no jinja2, no chat templates (transformers renders them with it): nothing to catch
    TemplateError = ()

from ..chat import (answer_lead, answer_text, build_prompt, chat_format, encode_prompt, eos_ids, stop_token_ids,
                    written_bos)
from ..jsonl import numbered_lines

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "system": "system"}


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where predicting this token is trained


@contextmanager
def naming(where: str):
    """A ValueError raised inside names the record it is about (`file:line`)."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def read_records(path: str | Path) -> list[dict]:
    return [record for _, record in read_numbered_records(path)]


def read_numbered_records(path: str | Path) -> list[tuple[str, dict]]:
    """(`file:line`, record) for each record of a jsonl file: errors found
    later (a chat template that refuses a conversation) name the record too."""
    records = []
    for number, line in numbered_lines(path):
        with naming(f"{path}:{number}"):
            record = json.loads(line)
            if not isinstance(record, dict) or not ({"conversations", "messages", "text"} & set(record)):
                raise ValueError("expected an object with 'conversations', 'messages' or 'text'")
            to_messages(record)  # check the record's shape now, while its line is known
        records.append((f"{path}:{number}", record))
    return records


def to_messages(record: dict) -> list[dict] | None:
    """{"role", "content"} messages of a conversation record; None for plain text."""
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"'text' must be a string, got {type(record['text']).__name__}")
        return None
    key = "messages" if "messages" in record else "conversations"
    turns = record[key]
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise ValueError(f"{key!r} must be a list of objects")
    messages = []
    for turn in turns:  # either naming in either list: {"role", "content"} or ShareGPT's {"from", "value"}
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"unsupported conversation turn: role {role!r} with {type(content).__name__} content "
                             f"(roles: {', '.join(sorted(ROLES))}; content: a string)")
        messages.append({"role": ROLES[role], "content": content})
    return without_leading_answers(messages)


def without_leading_answers(messages: list[dict]) -> list[dict]:
    """The conversation without the assistant turns before its first user
    turn (ShareGPT dumps often open with the model's greeting), as the EAGLE
    reference drops them: no prompt asks for them, so neither training nor
    regeneration has a place for them."""
    first_user = next((k for k, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [m for k, m in enumerate(messages) if k >= first_user or m["role"] != "assistant"]


def render(messages: list[dict], model_type: str, tokenizer, system: str | None,
           generation_prompt: bool = True) -> str:
    """build_prompt, with a chat template's refusal (jinja2's TemplateError,
    e.g. Mixtral's and Llama-2's roles that must alternate) as a ValueError."""
    try:
        return build_prompt(messages, model_type, tokenizer, system, generation_prompt)
    except TemplateError as err:
        raise ValueError(f"the chat template refuses this conversation: {err}") from None


def format_stop_ids(tokenizer, model_type: str) -> set[int]:
    """The tokens that end an answer in this format, as the tokenizer knows
    them: its eos, the format's end-of-turn tokens (<|im_end|>), and
    <|eot_id|> for llama3 (the engine stops there too)."""
    ids = set(stop_token_ids(tokenizer, model_type)) | eos_ids(tokenizer)
    if chat_format(model_type).is_llama3 and "<|eot_id|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    return ids


def end_of_turn_ids(tokenizer, model_type: str, stop_ids=()) -> set[int]:
    """Tokens trained when the template writes one after an answer. Besides
    the named special tokens (`all_special_ids`: bos, eos, unk, pad) that is
    every added token marked special, such as Llama-3's <|eot_id|> where eos
    is <|end_of_text|>, and the ids the answers stop at (`stop_ids`, the
    base's own eos ids): a head that never learns the end-of-turn token
    cannot draft the end of an answer."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return (set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
            | format_stop_ids(tokenizer, model_type) | set(stop_ids))


def encode_text(text: str, tokenizer) -> Sample:
    ids = tokenizer(text).input_ids
    return Sample(ids, [1] * len(ids))


def encode_conversation(messages: list[dict], tokenizer, model_type: str = "auto", system: str | None = None,
                        end_ids: set[int] | None = None) -> Sample:
    """Token ids and loss mask of a conversation; `end_ids`: end_of_turn_ids."""
    messages = without_leading_answers(messages)
    text = render(messages, model_type, tokenizer, system, generation_prompt=False)
    spans, cursor = [], 0
    for k, message in enumerate(messages):
        content = message["content"]
        if message["role"] != "assistant" or not content.strip():
            continue
        # The answer starts where the prompt that asks for it ends: searching from
        # there, a short answer is never found inside the template's own text
        # ("A" in "ASSISTANT:") or inside an earlier turn.
        asking = render(messages[:k], model_type, tokenizer, system)
        cursor = max(cursor, len(os.path.commonprefix([asking, text])))
        start = text.find(content, cursor)
        if start < 0:  # some templates strip the turns
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise ValueError(f"the {model_type!r} prompt format does not contain assistant answer "
                             f"{sum(m['role'] == 'assistant' for m in messages[:k]) + 1} ({excerpt(content)}) verbatim "
                             "(does the chat template rewrite answers?)")
        end = start + len(content)
        while start > cursor and text[start - 1].isspace():  # the space the model writes first ("ASSISTANT: A")
            start -= 1
        spans.append((start, end))
        cursor = end
    ids = encode_prompt(text, tokenizer, model_type)
    skip = written_bos(text, tokenizer, model_type)  # tokenized as encode_prompt does: after the BOS it writes
    plain = tokenizer(text[skip:], add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(a + skip, b + skip) for a, b in plain.offset_mapping]
    lead = len(ids) - len(plain.input_ids)  # special tokens put in front (BOS)
    if lead < 0 or ids[lead:] != plain.input_ids:
        raise ValueError("cannot align the tokens of a conversation with its text")
    mask = [0] * len(ids)
    special = end_of_turn_ids(tokenizer, model_type) if end_ids is None else end_ids
    for start, end in spans:
        last = None
        for j, (a, b) in enumerate(offsets):
            if a < end and b > start:
                mask[lead + j] = 1
                last = j
        if last is None:
            continue
        # The end-of-turn token after the answer, and the whitespace the
        # template writes before it (llama2-chat: " answer </s>").
        after = last + 1
        while (after < len(plain.input_ids) and plain.input_ids[after] not in special
               and not text[slice(*offsets[after])].strip()):
            after += 1
        if after < len(plain.input_ids) and plain.input_ids[after] in special:
            for j in range(last + 1, after + 1):
                mask[lead + j] = 1
    return Sample(ids, mask)


def excerpt(text: str, length: int = 40) -> str:
    return repr(text if len(text) <= length else text[:length] + "...")


def encode_record(record: dict, tokenizer, model_type: str = "auto", system: str | None = None,
                  end_ids=None) -> Sample:
    """`end_ids`: end_of_turn_ids, or a function that gives them (asked
    only for conversations: plain text trains every token)."""
    messages = to_messages(record)
    if messages is None:
        return encode_text(record["text"], tokenizer)
    return encode_conversation(messages, tokenizer, model_type, system, end_ids() if callable(end_ids) else end_ids)


def to_samples(records: list[dict], tokenizer, model_type: str = "auto", max_length: int = 2048,
               system: str | None = None, purpose: str = "training", names: list[str] | None = None,
               stop_ids=()) -> list[Sample]:
    """Encode, truncate to max_length, and drop records with nothing to learn
    (an error when that leaves none; `purpose` names the data in it). An
    error about one record names it by `names` (`file:line`, read_numbered_records)
    or by its number; `stop_ids`: the base's eos ids (end_of_turn_ids)."""
    if max_length < 1:
        raise ValueError(f"--max-length must be at least 1, got {max_length}")
    end_ids = functools.cache(lambda: end_of_turn_ids(tokenizer, model_type, stop_ids))
    samples, empty, cut = [], 0, 0
    for number, record in enumerate(records):
        with naming(names[number] if names else f"{purpose} record {number + 1}"):
            sample = encode_record(record, tokenizer, model_type, system, end_ids)
        # A token is only predicted from two tokens before it (see ttt.py).
        if sum(sample.loss_mask[2:]) == 0:
            empty += 1
            continue
        sample = Sample(sample.input_ids[:max_length], sample.loss_mask[:max_length])
        if sum(sample.loss_mask[2:]) == 0:
            cut += 1
            continue
        samples.append(sample)
    if not samples:
        raise ValueError(f"no {purpose} samples in {len(records)} records: {empty} have no loss tokens "
                         f"(no assistant answer, or empty), {cut} have none within --max-length {max_length}")
    if cut:
        warnings.warn(f"{cut} of {len(records)} records have no loss tokens within the first {max_length} tokens "
                      "(--max-length) and were skipped")
    return samples


def check_prompts(records: list[dict], tokenizer, model_type: str = "auto", system: str | None = None,
                  names: list[str] | None = None) -> None:
    """Render each conversation and every prompt `regenerate` builds from it,
    so that a record the chat template refuses is named before the base
    model loads and generates, not after."""
    for number, record in enumerate(records):
        messages = to_messages(record)
        if messages is None:
            continue
        with naming(names[number] if names else f"record {number + 1}"):
            render(messages, model_type, tokenizer, system, generation_prompt=False)
            for k in answer_positions(messages):
                render(messages[:k], model_type, tokenizer, system)


def answer_positions(messages: list[dict]) -> list[int]:
    return [k for k, m in enumerate(messages) if m["role"] == "assistant"]


@torch.no_grad()
def greedy_continue(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                    batch_size: int = 16) -> list[list[int]]:
    """The base model's greedy continuation of each prompt (plain decoding
    with transformers' generate), cut after the first stop token. Prompts of
    equal length are batched together, so no padding is ever needed."""
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    # Nothing from the base's generation_config.json (repetition_penalty, no_repeat_ngram_size, min_new_tokens,
    # suppress_tokens, ...): the answers are its plain argmax ones, as the engine decodes greedily.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(stop_ids) or None, pad_token_id=min(stop_ids) if stop_ids else 0)
    results: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    for indices in by_length.values():
        for chunk in range(0, len(indices), batch_size):
            group = indices[chunk : chunk + batch_size]
            ids = torch.tensor([prompts[i] for i in group], device=device)
            with own_generation_config(model):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            for i, row in zip(group, out[:, ids.shape[1] :].tolist()):
                stop = next((k for k, t in enumerate(row) if t in stop_ids), None)
                results[i] = row if stop is None else row[: stop + 1]
    return results


@contextmanager
def own_generation_config(model):
    """generate() fills every setting its generation_config leaves unset
    from model.generation_config (the base's generation_config.json): a
    blank one while it runs leaves transformers' neutral defaults there."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def regeneration_stop_ids(model, tokenizer, model_type: str) -> set[int]:
    """Where a regenerated answer ends: the model's (generation_config and
    config, as the engine reads them) and tokenizer's eos ids and the format's
    end-of-turn tokens (<|eot_id|>, <|im_end|>)."""
    return format_stop_ids(tokenizer, model_type) | eos_ids(getattr(model, "generation_config", None),
                                                          getattr(model, "config", None))


def regenerate(records: list[dict], model, tokenizer, model_type: str = "auto", max_new_tokens: int = 512,
               system: str | None = None, batch_size: int = 16) -> list[dict]:
    """Records whose assistant turns are replaced, turn by turn, by the
    base model's greedy answer to the conversation so far. Plain-text
    records are kept as they are."""
    conversations = [to_messages(r) for r in records]
    stops = regeneration_stop_ids(model, tokenizer, model_type)
    stop_strings = chat_format(model_type).stop_strings
    # Decoded after its prompt, an answer starts with the space the template writes itself (answer_text).
    try:
        lead = answer_lead(model_type, tokenizer, system)
    except TemplateError:  # a template that refuses a one-question conversation: nothing to leave out
        lead = ""
    turn = 0
    while True:
        todo = [(i, m) for i, m in enumerate(conversations) if m is not None and len(answer_positions(m)) > turn]
        if not todo:
            break
        positions = [answer_positions(m)[turn] for _, m in todo]
        prompts = [encode_prompt(render(m[:k], model_type, tokenizer, system), tokenizer, model_type)
                   for (_, m), k in zip(todo, positions)]
        answers = greedy_continue(model, prompts, max_new_tokens, stops, batch_size)
        for (i, m), k, prompt, answer in zip(todo, positions, prompts, answers):
            m[k] = {"role": "assistant", "content": answer_text(tokenizer, prompt, answer, lead, stop_strings)}
        turn += 1
    return [r if m is None else {"messages": m} for r, m in zip(records, conversations)]


def token_counts(samples: list[Sample], vocab_size: int) -> torch.Tensor:
    """[V] how often each token is a trained prediction: the draft
    vocabulary is made of the most frequent ones."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sample in samples:
        ids = torch.tensor(sample.input_ids)[torch.tensor(sample.loss_mask, dtype=torch.bool)]
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, loss_mask, attention_mask [b, n]."""
    n = max(len(s.input_ids) for s in samples)
    batch = {key: torch.zeros(len(samples), n, dtype=torch.long)
             for key in ("input_ids", "loss_mask", "attention_mask")}
    for row, sample in enumerate(samples):
        k = len(sample.input_ids)
        batch["input_ids"][row, :k] = torch.tensor(sample.input_ids)
        batch["loss_mask"][row, :k] = torch.tensor(sample.loss_mask)
        batch["attention_mask"][row, :k] = 1
    return batch
