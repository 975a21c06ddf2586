"""Conversation prompts per model type."""

import pytest

from eagle_gto.chat import MODEL_TYPES, build_prompt, chat_format, stop_token_ids

TURNS = [{"role": "user", "content": "Q1 {braces}"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}]


@pytest.mark.parametrize("model_type,expected", [
    ("vicuna", "questions. USER: Q1 {braces} ASSISTANT: A1</s>USER: Q2 ASSISTANT:"),
    ("llama2-chat", "<</SYS>>\n\nQ1 {braces} [/INST] A1 </s><s>[INST] Q2 [/INST]"),
    ("llama3",
     "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("qwen", "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"),
    ("mixtral", "<s>[INST] Q1 {braces} [/INST] A1</s>[INST] Q2 [/INST]"),
    ("plain", "Q1 {braces}A1\n\nQ2"),
])
def test_templates_end_with_the_assistant_prompt(model_type, expected):
    assert build_prompt(TURNS, model_type).endswith(expected)


def test_system_prompt_and_auto_fallback():
    msgs = [{"role": "system", "content": "Be brief."}] + TURNS
    assert build_prompt(msgs, "qwen").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert build_prompt(msgs, "llama3").startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
    assert build_prompt(TURNS, "auto", tokenizer=None) == build_prompt(TURNS, "plain")
    assert "auto" in MODEL_TYPES
    with pytest.raises(ValueError, match="unknown model type"):
        build_prompt(TURNS, "gpt")


def test_a_conversations_own_system_prompt_wins_and_training_text_has_no_open_turn():
    own = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."}] + TURNS
    # `system` is the prompt for conversations that have none (the trainer's --system).
    assert "Be brief.\n\nBe kind." in build_prompt(own, "qwen", system="DEFAULT")
    assert "DEFAULT" not in build_prompt(own, "qwen", system="DEFAULT")
    assert "DEFAULT" in build_prompt(TURNS, "qwen", system="DEFAULT")
    answered = TURNS + [{"role": "assistant", "content": "A2"}]
    for model_type in MODEL_TYPES:
        text = build_prompt(answered, model_type, generation_prompt=False)
        assert text.rstrip().endswith(("A2", "A2</s>", "A2 </s>", "A2<|eot_id|>", "A2<|im_end|>")), model_type


def test_formats_without_a_system_slot_open_the_first_user_turn_with_it():
    msgs = [{"role": "system", "content": "Be brief."}] + TURNS
    assert build_prompt(msgs, "mixtral").startswith("<s>[INST] Be brief.\n\nQ1 {braces} [/INST] A1</s>[INST] Q2")
    assert build_prompt(msgs, "plain") == "Be brief.\n\nQ1 {braces}A1\n\nQ2"
    alone = [{"role": "system", "content": "Be brief."}]  # no user turn to open: it is the first one
    assert build_prompt(alone, "mixtral") == "<s>[INST] Be brief. [/INST]"
    assert build_prompt(alone, "plain") == "Be brief."


def test_a_conversation_without_a_user_turn_still_opens_an_answer():
    """Where only a user turn opens an assistant turn, a conversation with
    none gets an empty one: a system prompt alone is not dropped (Llama-2
    chat writes it inside the first user turn) nor left to be continued."""
    alone = [{"role": "system", "content": "Be brief."}]
    assert build_prompt(alone, "llama2-chat") == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n [/INST]"
    assert build_prompt(alone, "vicuna") == "Be brief. USER:  ASSISTANT:"
    assert build_prompt(alone + [{"role": "assistant", "content": "Hi."}], "llama2-chat", generation_prompt=False) \
        == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n [/INST] Hi. </s>"
    assert build_prompt([{"role": "assistant", "content": "Hi."}], "mixtral", generation_prompt=False) \
        == "<s>[INST]  [/INST] Hi.</s>"
    assert build_prompt(alone, "qwen").endswith("Be brief.<|im_end|>\n<|im_start|>assistant\n")  # had its place


def test_stop_token_ids_are_the_formats_stop_strings_in_the_vocabulary():
    class Tokenizer:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    # as FastChat's qwen-7b-chat: <|im_end|>, and a new turn or the end of text written without it
    qwen = Tokenizer({"<|endoftext|>": 5, "<|im_start|>": 6, "<|im_end|>": 7, "a": 1})
    assert stop_token_ids(qwen, "qwen") == [7, 6, 5]
    assert stop_token_ids(Tokenizer({"<|im_end|>": 7, "a": 1}), "qwen") == [7]  # only those that are tokens
    assert stop_token_ids(qwen, "llama3") == []
    assert stop_token_ids(qwen, "plain") == []  # the engine adds eos itself (and <|eot_id|> for llama3)


def _parsers():
    from application.server_options import build_parser
    from eagle_gto.__main__ import parse_args as demo
    from eagle_gto.benchmarks.reference_parity import parse_args as parity
    from eagle_gto.evaluation.gen_answer import parse_args as answers
    from eagle_gto.gto.__main__ import config_parser
    from eagle_gto.train.__main__ import parse_args as train

    return {"servers": build_parser("test", "", 0).parse_args, "demo": demo, "gen_answer": answers,
            "train": lambda argv: train(["--data", "x.jsonl", "--base-model-path", "b", "--out", "o", *argv]),
            "gto": config_parser("").parse_args,
            "parity": lambda argv: parity(["--reference-path", "x", *argv])}


@pytest.mark.parametrize("command", ["servers", "demo", "gen_answer", "train", "gto", "parity"])
def test_every_command_takes_the_reference_web_uis_model_types(command):
    """`--model-type llama-3-instruct` / `llama-2-chat` (the reference web UI's) name llama3 / llama2-chat."""
    parse = _parsers()[command]
    assert parse(["--model-type", "llama-3-instruct"]).model_type == "llama3"
    assert parse(["--model-type", "llama-2-chat"]).model_type == "llama2-chat"
    assert parse(["--model-type", "qwen"]).model_type == "qwen"
    with pytest.raises(SystemExit):
        parse(["--model-type", "llama-3"])


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Llama-2, Vicuna, Mistral): its
    decoder drops the space before a text's first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁", "▁yes", "▁ASSISTANT:", "</s>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


@pytest.mark.parametrize("kind,answer,written", [
    ("byte-level", " yes", " yes"), ("byte-level", "  yes", "  yes"),
    ("sentencepiece", [2], " yes"), ("sentencepiece", [1, 2], "  yes"),  # "▁yes"; "▁", "▁yes"
])
@pytest.mark.parametrize("model_type", ["vicuna", "mixtral"])
def test_an_answer_goes_back_into_the_conversation_as_the_model_wrote_it(kind, answer, written, model_type):
    """Whatever the decoder does with a first word's space, the next turn's
    prompt text is the prompt and then exactly what the model wrote."""
    from test_api import char_tokenizer

    from application.text_stream import TextStream
    from eagle_gto.chat import answer_lead, answer_text, encode_prompt

    tokenizer = char_tokenizer() if kind == "byte-level" else metaspace_tokenizer()
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids if isinstance(answer, str) else answer
    asked = [{"role": "user", "content": "Q"}]
    prompt = build_prompt(asked, model_type)
    prompt_ids = encode_prompt(prompt, tokenizer, model_type)
    lead = answer_lead(model_type, tokenizer)
    kept = answer_text(tokenizer, prompt_ids, answer_ids, lead)
    assert TextStream(tokenizer, lead, prompt_ids).add(answer_ids, final=True) == kept  # the servers' answer
    again = build_prompt(asked + [{"role": "assistant", "content": kept}, {"role": "user", "content": "Q"}], model_type)
    assert again.startswith(prompt + written) and not again.startswith(prompt + written + " ")


def test_an_answer_after_special_tokens_or_before_punctuation_keeps_its_first_character():
    """The prompt's last tokens may all be special (left out in decoding: no context for the first word's
    space); and a clean-up of spaces before punctuation would reach across the seam into the answer."""
    from test_api import char_tokenizer

    from application.text_stream import TextStream
    from eagle_gto.chat import answer_text

    tokenizer = metaspace_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|user|>", "<|assistant|>"]})
    prompt = [2] + tokenizer.convert_tokens_to_ids(["<|end|>", "<|user|>", "<|end|>", "<|assistant|>"])
    assert tokenizer.decode(prompt[1:], skip_special_tokens=True) == ""
    assert answer_text(tokenizer, prompt, [2]) == " yes"  # "▁yes" after "yes"
    assert TextStream(tokenizer, context=prompt).add([2], final=True) == " yes"
    chars = char_tokenizer()
    chars.clean_up_tokenization_spaces = True
    prompt, answer = chars("Say a word ").input_ids, chars(". Done").input_ids
    assert answer_text(chars, prompt, answer) == ". Done"
    assert TextStream(chars, context=prompt).add(answer, final=True) == ". Done"


def test_formats_with_a_default_system_prompt_write_it_when_the_conversation_has_none():
    """Vicuna, Llama-2 chat and Qwen open every conversation with a system prompt: their own unless one is
    given (a system message or `system`); Llama-3 writes none of its own."""
    from eagle_gto.chat import LLAMA2_SYSTEM, VICUNA_SYSTEM

    asked = [{"role": "user", "content": "Q"}]
    qwen_default = "You are a helpful assistant."
    for system, vicuna, llama2, qwen in [(None, VICUNA_SYSTEM, LLAMA2_SYSTEM, qwen_default), ("S", "S", "S", "S")]:
        assert build_prompt(asked, "vicuna", system=system) == f"{vicuna} USER: Q ASSISTANT:"
        assert build_prompt(asked, "llama2-chat", system=system) == (f"<s>[INST] <<SYS>>\n{llama2}\n<</SYS>>\n\n"
                                                                     "Q [/INST]")
        assert build_prompt(asked, "qwen", system=system) == (f"<|im_start|>system\n{qwen}<|im_end|>\n"
                                                              "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(asked, "llama3") == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                                             "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama2_chats_default_system_prompt_is_the_references_in_full():
    """The reference's web UI and evaluation scripts give Llama-2 chat Meta's whole default system prompt
    (eagle/evaluation/gen_ea_answer_llama2chat.py), not its first two sentences."""
    reference = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
                 "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
                 "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
                 "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
                 "instead of answering something not correct. If you don't know the answer to a question, please "
                 "don't share false information.")
    assert build_prompt([{"role": "user", "content": "Q"}], "llama2-chat") == (
        f"<s>[INST] <<SYS>>\n{reference}\n<</SYS>>\n\nQ [/INST]")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_prompt_gets_a_bos_from_the_tokenizer_only_where_its_template_writes_none(model_type):
    """Llama-2 chat and Mixtral write <s>, Llama-3 <|begin_of_text|>, a tokenizer's chat template its own:
    the tokenizer must not add a second one. The others' text has none, so the tokenizer adds it."""
    from types import SimpleNamespace

    from eagle_gto.chat import encode_prompt

    class RecordingTokenizer:
        chat_template = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}"
        seen = []

        def __call__(self, text, add_special_tokens=True):
            self.seen.append(add_special_tokens)
            return SimpleNamespace(input_ids=[])

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<bos>" + "".join(m["content"] for m in messages)

    tokenizer = RecordingTokenizer()
    text = build_prompt(TURNS, model_type, tokenizer)
    encode_prompt(text, tokenizer, model_type)
    assert tokenizer.seen == [not text.startswith(("<s>", "<|begin_of_text|>", "<bos>"))]


def test_an_answer_is_cut_before_the_formats_stop_string():
    """A tokenizer without Qwen's <|im_end|> as one token writes it as text: the turn ends before it."""
    from test_api import char_tokenizer

    from eagle_gto.chat import answer_text

    chars = char_tokenizer()
    prompt, answer = chars("Q:").input_ids, chars(" yes<|im_end|>\n<|im_start|>user").input_ids
    assert answer_text(chars, prompt, answer, stop_strings=("<|im_end|>",)) == " yes"
    assert answer_text(chars, prompt, answer, lead=" ", stop_strings=("<|im_end|>",)) == "yes"
    assert answer_text(chars, prompt, answer) == chars.decode(answer)  # no stop strings: all of it
    # a model that opens a new turn or ends the text without closing its own: cut there too
    for stop in ("<|im_start|>", "<|endoftext|>"):
        answer = chars(f" yes{stop}user").input_ids
        assert answer_text(chars, prompt, answer, stop_strings=chat_format("qwen").stop_strings) == " yes"


def test_an_answer_streamed_token_by_token_keeps_every_words_space():
    """Each text is decoded after the tokens before it: a SentencePiece decoder alone drops the space
    before a text's first word, so "▁yes" after "▁yes" must still be " yes"."""
    from application.text_stream import TextStream
    from eagle_gto.chat import answer_text

    tokenizer = metaspace_tokenizer()
    prompt, answer = [3], [2, 2, 1, 2]  # "▁ASSISTANT:" then "▁yes", "▁yes", "▁", "▁yes"
    stream = TextStream(tokenizer, context=prompt)
    pieces = [stream.add([token]) for token in answer] + [stream.add([], final=True)]
    assert "".join(pieces) == answer_text(tokenizer, prompt, answer) == " yes yes  yes"
    assert pieces[1] == " yes"


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("model_type", ["llama2-chat", "mixtral"])
def test_a_written_bos_gives_the_references_tokens(model_type, legacy):
    """The reference's Llama-2 chat and Mixtral text has no <s>: its tokenizer adds the BOS and reads "[INST]" as a
    text's start ("▁["). A SentencePiece tokenizer without the legacy space after special tokens (transformers'
    default) reads a written "<s>[INST]" as "<s>", "[": the prompt and the trainer's tokens must not."""
    from transformers import LlamaTokenizer

    from eagle_gto.chat import encode_prompt
    from eagle_gto.train.data import encode_conversation

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for char in "[]/<>INSTYQA12 \n":
        vocab.setdefault(char, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], legacy=legacy, add_bos_token=True)
    asked = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}]
    text = build_prompt(asked, model_type, tokenizer, system="S")
    ids = encode_prompt(text, tokenizer, model_type)
    assert ids == tokenizer(text.removeprefix("<s>")).input_ids  # as the reference tokenizes its text
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<s>", "▁", "["]
    answered = asked + [{"role": "assistant", "content": "A2"}]
    sample = encode_conversation(answered, tokenizer, model_type, "S")
    full = build_prompt(answered, model_type, tokenizer, system="S", generation_prompt=False)
    assert sample.input_ids == encode_prompt(full, tokenizer, model_type)
    trained = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])
    assert trained.replace(" ", "") == "A1</s>A2</s>"


def test_llama3_prompts_are_the_tokenizers_chat_template_as_the_references():
    """The reference's Llama-3 scripts write prompts with `tokenizer.apply_chat_template`: Llama-3's template trims
    every turn, Llama-3.1's opens with a system turn holding its date lines. Without a template: the format written."""
    from test_api import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.chat_template = (  # a Llama-3.1-like template: trims, and always writes a system turn with a date
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}{% endif %}<|eot_id|>"
        "{% for m in messages if m['role'] != 'system' %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    asked = [{"role": "user", "content": "Q1\n"}, {"role": "assistant", "content": " A1\n"},
             {"role": "user", "content": "Q2"}]
    reference = tokenizer.apply_chat_template([{"role": "system", "content": "S"}] + asked, tokenize=False,
                                              add_generation_prompt=True)
    assert build_prompt(asked, "llama3", tokenizer, system="S") == reference
    assert "\n\nQ1<|eot_id|>" in reference and "Today Date" in reference
    assert build_prompt(asked, "llama3", system="S").startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>")


def test_a_llama3_system_prompt_with_braces_is_written_as_it_is():
    """Without a tokenizer template llama3's format is written out: braces in the system prompt are text."""
    messages = [{"role": "system", "content": "answer in {json}"}, {"role": "user", "content": "hi"}]
    assert "system<|end_header_id|>\n\nanswer in {json}<|eot_id|>" in build_prompt(messages, "llama3")


@pytest.mark.parametrize("model_type", ["llama2-chat", "mixtral"])
def test_a_prompt_not_opening_with_the_tokenizers_bos_is_tokenized_whole(model_type):
    """A written <s> is given as the tokenizer's BOS id; with a tokenizer whose BOS is another text (Gemma's
    <bos>), the format's <s> is text like the rest: nothing is cut from the prompt's start."""
    from types import SimpleNamespace

    from eagle_gto.chat import encode_prompt

    class RecordingTokenizer:
        bos_token, bos_token_id = "<bos>", 2
        seen = []

        def __call__(self, text, add_special_tokens=True):
            self.seen.append((text, add_special_tokens))
            return SimpleNamespace(input_ids=[7])

    tokenizer = RecordingTokenizer()
    text = build_prompt(TURNS, model_type)
    assert encode_prompt(text, tokenizer, model_type) == [7]
    assert tokenizer.seen == [(text, False)]


def test_a_template_writing_answers_otherwise_than_it_asks_for_them_has_no_lead():
    """The lead is what the format writes between a prompt and its answer; a chat template whose written answer
    turn does not begin with the prompt that asks for it has none: no piece of its text is taken for one."""
    from eagle_gto.chat import answer_lead

    class Tokenizer:
        chat_template = "(asks with <bot>, writes answers after <assistant>)"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
            return turns + "<bot>" if add_generation_prompt else turns

    assert answer_lead("auto", Tokenizer()) == ""
