"""The HTTP API's own rules, in process, over a scripted model: it answers
every prompt with the same text, one token per step in plain decoding and
STEP tokens per step (accepted drafts) in speculative decoding, so each rule
is checked in both modes in milliseconds."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from test_api import char_tokenizer

from application.api_server import create_app
from application.chat_runner import TOO_LONG_CHARS_PER_TOKEN, ChatRunner, GenerationOptions
from application.text_stream import TextStream, until_stop
from eagle_gto.acceptance import SamplingParams, target_probs
from eagle_gto.generation import GenerationStats, Step

ANSWER = "abcdefghijklmnopqrstuvwxyz"
STEP = 4  # tokens per speculative step
CAP = 20  # the server's --max-new-tokens
# Mixtral's and Llama-2's rule: roles alternate user/assistant, starting with user (so no system message).
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{{ m['content'] }}{% endfor %}")


class ScriptedModel:
    """Stands in for EaModel where ChatRunner uses it."""

    tree = SimpleNamespace(total_token=STEP, depth=STEP - 1, top_k=1)
    base_model = SimpleNamespace(get_output_embeddings=lambda: torch.nn.Linear(1, 1))  # where sampling happens

    def __init__(self, answer: str = ANSWER, tokenizer=None):
        self.tokenizer = tokenizer or char_tokenizer()
        self.tokenizer.chat_template = ALTERNATING
        self.answer = answer
        self.calls = []  # each generation's options
        self.vocab_size = len(self.tokenizer)  # the format's stop tokens are checked against it

    def check_max_length(self, max_length):
        pass

    def default_max_length(self):
        return 2048

    def generate_steps(self, input_ids, *, max_new_tokens, speculative, **options):
        self.calls.append(dict(options, max_new_tokens=max_new_tokens))
        tokens = self.tokenizer(self.answer).input_ids[:max_new_tokens]
        width = STEP if speculative else 1
        for start in range(0, len(tokens), width):
            step = tokens[start:start + width]
            yield Step(step, len(step) - 1, 0.001, "length" if start + width >= len(tokens) else None)


@pytest.fixture(scope="module")
def model():
    return ScriptedModel()


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(ChatRunner(model), "scripted", CAP)) as client:
        yield client


def complete(client, body: dict, chat: bool = False) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of a completion (or with `chat`, a chat completion), streamed or not."""
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def text_of(choice: dict) -> str:
        return (choice.get("message") or choice.get("delta") or {}).get("content", "") if chat else choice["text"]

    if not body.get("stream"):
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        return text_of(answer["choices"][0]), answer["choices"][0]["finish_reason"], answer["usage"]
    text, reason, usage = "", None, None
    with client.stream("POST", path, json={**body, "stream_options": {"include_usage": True}}) as events:
        for line in events.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    text, reason = text + text_of(choice), choice["finish_reason"] or reason
                usage = chunk.get("usage") or usage
    return text, reason, usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stops,text", [(["f"], "abcde"), (["defgh", "ef"], "abcd")])
def test_stop_strings_and_usage_agree_in_both_modes(client, stream, stops, text):
    """Decoding stops at the stop string that is complete first, whatever a
    speculative step brings after it; usage counts the tokens up to and
    including the one that completes it ("f", the 6th)."""
    for speculative in (True, False):
        body = {"prompt": "x", "max_tokens": CAP, "stop": stops, "speculative": speculative, "stream": stream}
        answer, reason, usage = complete(client, body)
        assert (answer, reason, usage["completion_tokens"]) == (text, "stop", 6), f"speculative={speculative}"


def test_a_chat_answer_ends_before_the_formats_end_of_turn_written_as_text():
    """A tokenizer without Qwen's <|im_end|> as one token writes it as text: a chat answer ends before it, as
    gen_answer's (chat.answer_text) does, and usage counts the tokens up to it; a completion is raw text."""
    from eagle_gto.chat import answer_lead, answer_text, chat_format

    answer = " yes<|im_end|>\n<|im_start|>user\nmore"
    runner = ChatRunner(ScriptedModel(answer), "qwen")
    messages = [{"role": "user", "content": "can you?"}]
    tokenizer = runner.tokenizer
    written = answer_text(tokenizer, runner.chat_prompt(messages), tokenizer(answer).input_ids,
                          answer_lead("qwen", tokenizer), chat_format("qwen").stop_strings)
    assert written == " yes"
    with TestClient(create_app(runner, "scripted", 100)) as client:
        for speculative in (True, False):
            for stream in (False, True):
                options = {"max_tokens": 100, "speculative": speculative, "stream": stream}
                text, reason, usage = complete(client, {"messages": messages, **options}, chat=True)
                assert (text, reason, usage["completion_tokens"]) == (written, "stop", len(" yes<|im_end|>"))
                assert complete(client, {"prompt": "can you?", **options})[:2] == (answer, "length")


@pytest.mark.parametrize("stop", ["😀", "d€", "é", "x", "€é😀"])
def test_usage_after_a_stop_string_counts_tokens_not_steps(stop):
    """One token per byte: a step may end inside a character, whose text comes with the next step. Usage
    counts the tokens up to the one completing the stop string, the same in both modes."""
    from test_evaluation import byte_tokenizer

    answer = "ab😀cd€é😀x"
    runner = ChatRunner(ScriptedModel(answer, byte_tokenizer()), "plain")
    expected = (answer[:answer.index(stop)], "stop", len(answer[:answer.index(stop) + len(stop)].encode()))
    with TestClient(create_app(runner, "scripted", 40)) as client:
        for speculative in (True, False):
            for stream in (False, True):
                body = {"prompt": "q", "max_tokens": 40, "stop": [stop], "speculative": speculative, "stream": stream}
                assert complete(client, body)[:2] == expected[:2]
                assert complete(client, body)[2]["completion_tokens"] == expected[2], (speculative, stream)


def test_the_servers_system_prompt_opens_conversations_that_send_none(monkeypatch):
    """--system, as gen_answer's and the reference's scripts give one (its web UI always passes Llama-3 a long
    one); a system message a client sends wins."""
    from application import server_options

    class Loaded(ScriptedModel):  # what load_runner reads of a loaded model
        cuda_graphs, torch_compile = False, None

    monkeypatch.setattr(server_options, "load_model", lambda args: Loaded())
    monkeypatch.setattr(server_options.ChatRunner, "make_caches", lambda runner: None)
    monkeypatch.setattr(server_options.ChatRunner, "warm_up", lambda runner: 0)
    parser = server_options.build_parser("test", "", 0)
    runner = server_options.load_runner(parser, parser.parse_args(["--model-type", "vicuna", "--system", "Be brief."]))
    asked = [{"role": "user", "content": "Hi?"}]
    assert runner.tokenizer.decode(runner.chat_prompt(asked)) == "Be brief. USER: Hi? ASSISTANT:"
    own = [{"role": "system", "content": "Be kind."}] + asked
    assert runner.tokenizer.decode(runner.chat_prompt(own)) == "Be kind. USER: Hi? ASSISTANT:"
    default = server_options.load_runner(parser, parser.parse_args(["--model-type", "vicuna"]))
    assert runner.tokenizer.decode(default.chat_prompt(asked)).startswith("A chat between a curious user")


@pytest.mark.parametrize("model_type", ["vicuna", "mixtral", "llama2-chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_answer_goes_back_into_the_next_prompt_as_the_model_wrote_it(model_type, stream):
    """These formats write a space before an answer, and a byte-level tokenizer (as the one-character one
    here) decodes the model's " yes" with its own: the answer is sent without the format's space, so that
    the next turn's prompt holds the tokens the model wrote, not two spaces. Stop strings and usage count
    from the answer as sent; a plain completion keeps its space."""
    runner = ChatRunner(ScriptedModel(" yes, I can: abc"), model_type)
    asked = [{"role": "user", "content": "can you?"}]
    with TestClient(create_app(runner, "scripted", CAP)) as client:
        for speculative in (True, False):
            body = {"messages": asked, "max_tokens": CAP, "speculative": speculative, "stream": stream}
            answer, reason, usage = complete(client, body, chat=True)
            assert (answer, reason, usage["completion_tokens"]) == ("yes, I can: abc", "length", 16)
            turns = [{"role": "assistant", "content": answer}, {"role": "user", "content": "?"}]
            again = runner.chat_prompt(asked + turns)
            written = runner.chat_prompt(asked) + runner.tokenizer(" yes, I can: abc").input_ids
            assert again[:len(written)] == written
            # "e" ends 2 characters into the answer as sent: 3 tokens with the space the model wrote first.
            answer, reason, usage = complete(client, {**body, "stop": ["e"]}, chat=True)
            assert (answer, reason, usage["completion_tokens"]) == ("y", "stop", 3)
            plain = {"prompt": "x", "max_tokens": 3, "speculative": speculative, "stream": stream}
            assert complete(client, plain)[0] == " ye"


@pytest.mark.parametrize("tokens,final,text", [
    ([" ", "yes"], True, "yes"),  # the lead alone first: held until the text shows it is the lead
    ([" ", " ", "x"], True, " x"),  # only one lead is left out
    (["y", " "], True, "y "),  # text without the lead is kept
    ([" "], True, ""),  # an answer that is only the lead
    ([" "], False, ""),  # held: it may still be the lead
])
def test_text_stream_leaves_out_the_lead(tokens, final, text):
    tokenizer = char_tokenizer()
    stream = TextStream(tokenizer, lead=" ")
    ids = [tokenizer(t).input_ids for t in tokens]
    assert "".join(stream.add(i, final=final and k == len(ids) - 1) for k, i in enumerate(ids)) == text
    two = TextStream(tokenizer, lead=" \n")  # a longer lead, one character a token
    assert two.add(tokenizer(" ").input_ids) == "" and two.add(tokenizer("\nab").input_ids) == "ab"
    assert TextStream(tokenizer, lead=" \n").add(tokenizer("y").input_ids) == "y"  # not the lead's start: not held



def test_text_held_back_as_the_lead_keeps_its_origin():
    """Text held back while it may be the lead is sent with the origin of the piece it came with."""
    tokenizer = char_tokenizer()
    stream = TextStream(tokenizer, lead=" \n")
    assert stream.add_piece(tokenizer(" ").input_ids, True) == []
    assert stream.add_piece(tokenizer("x").input_ids, False) == [(" ", True), ("x", False)]
    lead = TextStream(tokenizer, lead=" \n")
    assert lead.add_piece(tokenizer(" ").input_ids, True) + lead.add_piece(tokenizer("\nx").input_ids, False) == [
        ("x", False)]


def test_a_draft_ending_inside_a_character_keeps_its_whole_characters_origin():
    """One token per byte: a draft ends inside "é"; the text up to it is the draft's, and the character cut in two
    comes with the target's token that completes it."""
    from test_evaluation import byte_tokenizer

    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer)
    ids = tokenizer("abé").input_ids  # 4 bytes
    assert stream.add_piece(ids[:3], True) == [("ab", True)]
    assert stream.add_piece(ids[3:], False) + stream.add_piece(tokenizer("c").input_ids, True) == [
        ("é", False), ("c", True)]
    cut_twice = TextStream(tokenizer)
    assert [cut_twice.add_piece([i], True) for i in tokenizer("a😀").input_ids] == [[("a", True)], [], [], [],
                                                                                   [("😀", True)]]


@pytest.mark.parametrize("messages", [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                      [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]])
def test_a_chat_template_refusal_is_a_bad_request(client, messages):
    response = client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "Conversation roles must alternate" in error["message"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages")


@pytest.mark.parametrize("seed", [-2**63, 2**64 - 1])
def test_every_seed_torch_takes_is_accepted(client, seed):
    assert complete(client, {"prompt": "x", "max_tokens": 3, "temperature": 1, "seed": seed})[0] == "abc"


def test_top_p_0_keeps_only_the_most_probable_token(client, model):
    complete(client, {"prompt": "x", "max_tokens": 3, "temperature": 1, "top_p": 0})
    top_p = model.calls[-1]["top_p"]
    logits = torch.randn(4, 128256, generator=torch.Generator().manual_seed(0)) * 0.1  # flat: a big vocabulary
    probs = target_probs(logits, SamplingParams(1.0, top_p))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float())


def test_max_tokens_beyond_the_server_cap(client):
    """The cap is kept, says so in /v1/models, and ends the answer as the client's own limit would."""
    assert client.get("/v1/models").json()["data"][0]["max_tokens"] == CAP
    text, reason, usage = complete(client, {"prompt": "x", "max_tokens": CAP + 5})
    assert (text, reason, usage["completion_tokens"]) == (ANSWER[:CAP], "length", CAP)


def test_null_is_the_default(client, model):
    """OpenAI's API takes null for a field left out."""
    body = {"prompt": "x", "max_tokens": 3, "temperature": None, "top_p": None, "n": None, "stream": None,
            "speculative": None}
    assert complete(client, body)[:2] == ("abc", "length")
    assert (model.calls[-1]["temperature"], model.calls[-1]["top_p"]) == (1.0, 1.0)


@pytest.mark.parametrize("part,param,message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "messages.0.content.1.type",
     "only text content parts are supported, not 'image_url'"),
    ({"type": "text"}, "messages.0.content.1.text", "a text content part needs its text"),
])
def test_only_text_content_parts(client, part, param, message):
    content = [{"type": "text", "text": "Describe this:"}, part]
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}


@pytest.mark.parametrize("endpoint,fields,param", [
    ("completions", {"echo": True}, "echo"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat/completions", {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat/completions", {"presence_penalty": 1.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": 2}, "frequency_penalty"),
    ("completions", {"logit_bias": {"5": -100}}, "logit_bias"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "zzz"}, "suffix"),
])
def test_what_the_server_cannot_answer_is_refused(client, endpoint, fields, param):
    """Rather than an answer without what was asked for."""
    prompt = {"prompt": "x"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "x"}]}
    response = client.post(f"/v1/{endpoint}", json={**prompt, "max_tokens": 3, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert param in error["message"]


@pytest.mark.parametrize("fields", [{"echo": False, "logprobs": 0}, {"echo": None, "logprobs": None},
                                    {"logprobs": False, "top_logprobs": None, "stream_options": None},
                                    {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1,
                                     "suffix": None}])  # what LangChain's OpenAI sends by default
def test_asking_for_nothing_unsupported_is_fine(client, fields):
    assert complete(client, {"prompt": "x", "max_tokens": 3, **fields})[0] == "abc"


@pytest.mark.parametrize("tool_choice", ["none", "auto"])  # "auto" with no tools: no tool call either
def test_asking_chat_for_nothing_unsupported_is_fine(client, tool_choice):
    fields = {"response_format": {"type": "text"}, "tools": [], "tool_choice": tool_choice, "presence_penalty": 0}
    assert complete(client, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, **fields},
                    chat=True)[0] == "abc"


def test_models_retrieve(client):
    """GET /v1/models/{id}, as client.models.retrieve calls it; another id is OpenAI's 404."""
    assert client.get("/v1/models/scripted").json() == client.get("/v1/models").json()["data"][0]
    response = client.get("/v1/models/gpt-4o")
    assert response.status_code == 404
    assert response.json()["error"] == {"message": "the model 'gpt-4o' does not exist; this server serves 'scripted'",
                                        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


class GatedModel(ScriptedModel):
    """The scripted answer, each step after the first only once `gate` is set; `steps` records how many
    steps each generation made."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.steps = []

    def generate_steps(self, input_ids, **options):
        made = 0
        try:
            for step in super().generate_steps(input_ids, **options):
                if made:
                    self.gate.wait(timeout=60)
                made += 1
                yield step
        finally:
            self.steps.append(made)


def http_scope(method: str, path: str, headers: list) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


async def post(app, path: str, body: dict, leave: asyncio.Event) -> list[dict]:
    """POST `body` to the ASGI app as a client that goes away once `leave` is set; what the app sent back."""
    scope = http_scope("POST", path, [(b"content-type", b"application/json")])
    unread = [{"type": "http.request", "body": json.dumps(body).encode()}]
    sent = []

    async def receive():
        if unread:
            return unread.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_a_client_that_goes_away_frees_the_model():
    """Without streaming too: a request whose client went away while it waited for the model never
    runs, and a generation whose client went away is closed at its next step, not run to its end."""
    model = GatedModel()
    runner = ChatRunner(model)
    app = create_app(runner, "scripted", CAP)
    body = {"prompt": "x", "max_tokens": CAP, "speculative": False}  # 20 steps

    async def clients():
        first_left, second_left = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(post(app, "/v1/completions", body, first_left))
        while not model.calls:  # the first holds the model, at its second step until the gate opens
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(post(app, "/v1/completions", body, second_left))
        second_left.set()
        await asyncio.wait([second], timeout=30)  # it returns at once; before the fix, only after the first
        first_left.set()
        await asyncio.sleep(0.2)  # the disconnect is seen while the step waits
        model.gate.set()
        await asyncio.gather(first, second)

    asyncio.run(clients())
    assert len(model.steps) == 1 and model.steps[0] < CAP
    assert not runner.busy


async def get(app, path: str) -> list[dict]:
    """GET `path` from the ASGI app; what the app sent back."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    await app(http_scope("GET", path, []), receive, send)
    return sent


def test_tokenizing_a_prompt_does_not_hold_up_other_clients():
    """The prompt is tokenized in a worker thread: a long one does not stop the event loop."""
    answered = threading.Event()
    waited = []

    class SlowTokenizerRunner(ChatRunner):
        def text_prompt(self, text):
            waited.append(answered.wait(timeout=10))  # released once /health has been answered
            return super().text_prompt(text)

    app = create_app(SlowTokenizerRunner(ScriptedModel()), "scripted", CAP)

    async def clients():
        completion = asyncio.ensure_future(post(app, "/v1/completions", {"prompt": "x", "max_tokens": 3},
                                                asyncio.Event()))
        await asyncio.sleep(0.05)
        health = await asyncio.wait_for(get(app, "/health"), timeout=5)
        answered.set()
        return health, await completion

    health, completion = asyncio.run(clients())
    assert health[0]["status"] == 200 and completion[0]["status"] == 200
    assert waited == [True]


@pytest.mark.parametrize("endpoint,body,param", [
    ("completions", b'{"prompt": "abc\\ud800def", "max_tokens": 3}', "prompt"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "abc\\udc00"}]}', "messages"),
])
def test_a_lone_surrogate_is_a_bad_request(client, endpoint, body, param):
    """Valid JSON (a client that cut a string inside an emoji), but not Unicode text."""
    response = client.post(f"/v1/{endpoint}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "lone surrogate" in error["message"] and error["param"] == param


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_sent_as_another_content_type_is_named(client, content_type):
    """`curl -d '{...}'` without `-H "Content-Type: application/json"` sends a form: the body is a JSON
    object, but the server does not read it as one. The error says so, not that the body is no JSON object."""
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 3}', headers=headers)
    if response.status_code == 200:  # (older FastAPI, without strict_content_type, reads it as JSON)
        assert content_type is None
        return
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "Content-Type: application/json" in message and (content_type or "without a Content-Type") in message


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          "application/merge-patch+json"])
def test_a_body_under_any_json_content_type_is_read_as_json(client, content_type):
    """FastAPI reads the body as JSON under a parameter, capitals or a +json subtype: an object is answered,
    and an array is named as no JSON object, not as a body sent without the JSON content type."""
    headers = {"content-type": content_type}
    response = client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 3}', headers=headers)
    assert response.status_code == 200
    response = client.post("/v1/completions", content=b'[{"prompt": "x", "max_tokens": 3}]', headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("the request body must be a JSON object: ")


@pytest.mark.parametrize("field,value", [("max_tokens", True), ("max_tokens", "5"), ("stream", "yes"),
                                         ("seed", 1.5), ("n", "1"), ("speculative", 1), ("temperature", "0.5"),
                                         ("temperature", True), ("top_p", "1")])
def test_values_of_the_wrong_type_are_refused_not_coerced(client, field, value):
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_nan_is_refused_as_not_a_number(client, field):
    body = b'{"prompt": "x", "max_tokens": 3, "%s": NaN}' % field.encode()  # (Python's json reads NaN)
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field and "finite number" in error["message"]


def test_a_whole_number_is_a_number(client, model):
    assert complete(client, {"prompt": "x", "max_tokens": 3, "temperature": 1, "top_p": 1})[0] == "abc"
    assert (model.calls[-1]["temperature"], model.calls[-1]["top_p"]) == (1.0, 1.0)


def test_include_usage_null_is_the_default(client):
    body = {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": None}}
    with client.stream("POST", "/v1/completions", json=body) as events:
        lines = [line for line in events.iter_lines() if line.startswith("data: {")]
    assert lines and not any(json.loads(line[6:]).get("usage") for line in lines)


class OvercountingModel(ScriptedModel):
    """Steps cut by max_new_tokens keep the uncut accepted count, as the engine's do (the evaluation reads it)."""

    def generate_steps(self, input_ids, *, max_new_tokens, speculative, **options):
        for step in super().generate_steps(input_ids, max_new_tokens=max_new_tokens, speculative=speculative,
                                           **options):
            yield Step(step.tokens, STEP - 1 if speculative else 0, step.seconds, step.finish_reason)


def test_accepted_drafts_count_only_delivered_tokens():
    with TestClient(create_app(ChatRunner(OvercountingModel()), "scripted", CAP)) as client:
        for max_tokens in (1, 5, 6):
            answer = client.post("/v1/completions", json={"prompt": "x", "max_tokens": max_tokens}).json()
            stats, tokens = answer["speculative_stats"], answer["usage"]["completion_tokens"]
            delivered = [min(STEP, max_tokens - start) for start in range(0, max_tokens, STEP)]
            assert stats["accepted_draft_tokens"] == sum(min(STEP - 1, n) for n in delivered) <= tokens


def test_models_report_the_longest_answer_the_context_allows():
    with TestClient(create_app(ChatRunner(ScriptedModel(), max_length=10), "scripted", CAP)) as client:
        assert client.get("/v1/models").json()["data"][0]["max_tokens"] == 9


@pytest.mark.parametrize("stream", [False, True])
def test_text_held_back_as_a_possible_stop_string_is_sent_when_the_answer_ends(client, stream):
    """"t" may start the stop string "t!": held back, then sent once the answer ends without it."""
    for speculative in (True, False):
        body = {"prompt": "x", "max_tokens": CAP, "stop": ["t!"], "speculative": speculative, "stream": stream}
        prompt_tokens = len(char_tokenizer()("x").input_ids)
        assert complete(client, body) == (ANSWER[:CAP], "length", {"prompt_tokens": prompt_tokens,
                                                                   "completion_tokens": CAP,
                                                                   "total_tokens": prompt_tokens + CAP})


@pytest.mark.parametrize("chat", [False, True])
def test_an_event_stream_opens_and_ends_as_openais_does(client, chat):
    """A chat stream opens with the assistant's role and an empty text; every stream ends with the usage
    chunk (asked for) and then `data: [DONE]`, which clients such as LangChain's read as the end."""
    prompt = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
    body = {**prompt, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as events:
        data = [line[6:] for line in events.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    runner = ChatRunner(ScriptedModel())
    prompt_tokens = len(runner.chat_prompt(prompt["messages"]) if chat else runner.text_prompt("x"))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "abc"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk" if chat else "text_completion"}


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_is_the_chat_limit(client, stream):
    """OpenAI's newer name for max_tokens (which it deprecates): where both are given, it wins."""
    asked = {"messages": [{"role": "user", "content": "x"}], "stream": stream}
    assert complete(client, {**asked, "max_completion_tokens": 3}, chat=True)[:2] == ("abc", "length")
    assert complete(client, {**asked, "max_tokens": 10, "max_completion_tokens": 3}, chat=True)[:2] == ("abc", "length")


class PromptRecordingModel(ScriptedModel):
    def generate_steps(self, input_ids, **options):
        self.prompts = getattr(self, "prompts", []) + [input_ids[0].tolist()]
        return super().generate_steps(input_ids, **options)


def test_a_developer_message_is_a_system_message():
    """OpenAI's newer name for the system role, for the format's system prompt (not a turn)."""
    model = PromptRecordingModel()
    runner = ChatRunner(model, "qwen")
    with TestClient(create_app(runner, "scripted", CAP)) as client:
        for role in ("developer", "system"):
            messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "x"}]
            assert complete(client, {"messages": messages, "max_tokens": 3}, chat=True)[0] == "abc"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    assert model.prompts == [runner.chat_prompt(system)] * 2


def test_a_seed_reaches_the_model_as_a_generator_seeded_with_it(client, model):
    """Seed 0 too: a seeded request's sampling is reproducible; without a seed, the global generator."""
    for seed in (0, 7):
        complete(client, {"prompt": "x", "max_tokens": 3, "temperature": 1, "seed": seed})
        assert model.calls[-1]["generator"].initial_seed() == seed
    complete(client, {"prompt": "x", "max_tokens": 3, "temperature": 1})
    assert model.calls[-1]["generator"] is None


def test_a_prompt_fits_with_one_token_to_spare():
    """The engine's rule: the prompt and one new token fit in the context (here 10 tokens, one a character)."""
    with TestClient(create_app(ChatRunner(ScriptedModel(), max_length=10), "scripted", CAP)) as client:
        assert complete(client, {"prompt": "x" * 9, "max_tokens": 1})[:2] == ("a", "length")
        response = client.post("/v1/completions", json={"prompt": "x" * 10, "max_tokens": 1})
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_stop_takes_up_to_64_strings(client):
    """Stop strings are looked for after every step on the event loop, which every client shares: their
    number is bounded (a harness's few pass)."""
    stops = [f"stop{i}" for i in range(64)]
    assert complete(client, {"prompt": "x", "max_tokens": 8, "stop": stops[1:] + ["d"]})[:2] == ("abc", "stop")
    response = client.post("/v1/completions", json={"prompt": "x", "stop": stops + ["d"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"


@pytest.mark.parametrize("chat", [False, True])
def test_a_prompt_far_too_long_is_refused_before_it_is_tokenized_whole(monkeypatch, chat):
    """Tokenizing takes about 5 s and 0.5 GB per MB of text: a prompt far longer than the context (here 16
    tokens) is refused from the tokens of its start, so that a huge body cannot run the server out of memory."""
    runner = ChatRunner(ScriptedModel(), max_length=16)
    tokenized = []  # the length of each text the tokenizer was given
    tokenize = type(runner.tokenizer).__call__
    monkeypatch.setattr(type(runner.tokenizer), "__call__",
                        lambda self, text, **options: tokenized.append(len(text)) or tokenize(self, text, **options))
    text = "x" * 100_000
    path, body = ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}) if chat else \
        ("/v1/completions", {"prompt": text})
    with TestClient(create_app(runner, "scripted", CAP)) as client:
        response = client.post(path, json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert max(tokenized) <= TOO_LONG_CHARS_PER_TOKEN * 16


@pytest.mark.parametrize("speculative", [True, False])
def test_updates_split_the_text_into_accepted_drafts_and_the_targets_own_tokens(speculative):
    """A step's first num_accepted tokens are drafts the target accepted, the rest (the bonus) its own."""
    runner = ChatRunner(ScriptedModel())
    updates = list(runner.generate(runner.text_prompt("x"), GenerationOptions(CAP, speculative=speculative)))
    steps = [update.step for update in updates]
    assert [update.pieces for update in updates] == [
        [(text, drafted) for text, drafted in ((ANSWER[start:start + step.num_accepted], True),
                                               (ANSWER[start + step.num_accepted:start + len(step.tokens)], False))
         if text]
        for start, step in zip(range(0, CAP, len(steps[0].tokens)), steps)]
    assert all(u.pieces[0][1] is True for u in updates) is speculative


def test_a_generation_holds_the_model_until_it_ends_or_is_closed():
    """The caches are shared: from its first step to its end a generation keeps the lock (a second one
    waits for it), and closing it early frees the model."""
    runner = ChatRunner(ScriptedModel())
    options = GenerationOptions(CAP)
    updates = runner.generate(runner.text_prompt("x"), options)
    next(updates)
    assert runner.busy
    second = threading.Thread(target=lambda: list(runner.generate(runner.text_prompt("y"), options)))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # waiting for the lock
    updates.close()
    second.join(timeout=10)
    assert not second.is_alive() and not runner.busy
    list(runner.generate(runner.text_prompt("x"), options))  # run to its end: freed too
    assert not runner.busy


def test_stop_strings_send_what_brute_force_says_can_be_sent():
    """Against brute force, over random pieces of a two-letter text: after
    each piece, everything before the earliest-ending stop string is sent,
    and without a hit everything but the longest end that may start one;
    long stop strings hold back no more than the text not sent yet."""
    from application.api_server import StopStrings

    rng = torch.Generator().manual_seed(0)

    def word(length):
        return "".join("ab"[i] for i in torch.randint(0, 2, (length,), generator=rng).tolist())

    for _ in range(300):
        stops = [word(int(n)) for n in torch.randint(1, 6, (int(torch.randint(1, 4, (1,), generator=rng)),),
                                                       generator=rng)]
        stops.append("a" * 5000)  # longer than any text here: can be started, never completed
        stopper, text, sent = StopStrings(stops), "", ""
        for piece in [word(int(n)) for n in torch.randint(0, 4, (8,), generator=rng)]:
            text += piece
            sent += stopper.feed(piece)
            hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
            if hits:
                assert stopper.hit and sent == text[:min(hits)[1]], (stops, text)
                break
            may_start = [k for k in range(1, len(text) + 1) for s in stops if s.startswith(text[len(text) - k:])]
            assert not stopper.hit and sent == text[:len(text) - max(may_start, default=0)], (stops, text)


def test_a_long_held_run_costs_work_linear_in_the_text():
    """A stop string of 2,000 spaces, over an answer of spaces: all of it is held, and each step's text is
    matched with work linear in the text. Work is counted as the Python lines the matcher runs (no clock):
    testing each possible start at the text's end ran about a hundred times more here (and took 15 s of the
    event loop every client shares with a stop string ten times as long)."""
    from application import text_stream
    from application.api_server import StopStrings

    lines = 0

    def count(frame, event, arg):
        nonlocal lines
        if frame.f_code.co_filename != text_stream.__file__:
            return None
        lines += event == "line"
        return count

    stopper, text = StopStrings([" " * 2_000 + "x"]), " " * 10
    sys.settrace(count)
    try:
        sent = "".join(stopper.feed(text) for _ in range(200))
        last = stopper.feed("x")
    finally:
        sys.settrace(None)
    assert sent == "" and last == "" and stopper.hit
    assert 0 < lines < 20 * (200 * len(text) + 1)  # 0: the trace missed StopStrings' module (moved?)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_request_limit_is_refused_before_it_is_read_whole(model, chunked):
    """A body over --max-request-mb gets 413 in the API's error format, whether it declares its length or
    comes in chunks (then once its bytes pass the limit); one within the limit is answered, and the server
    goes on serving."""
    body = json.dumps({"prompt": "x" * 5000, "max_tokens": 2}).encode()
    small = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    headers = {"content-type": "application/json"}

    def post(client, data):
        content = (data[i:i + 1000] for i in range(0, len(data), 1000)) if chunked else data
        return client.post("/v1/completions", content=content, headers=headers)

    with TestClient(create_app(ChatRunner(model), "scripted", CAP, max_request_bytes=4096)) as client:
        refused = post(client, body)
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "request_too_large"
        assert "4096 bytes" in refused.json()["error"]["message"]
        answered = post(client, small)
        assert answered.status_code == 200 and answered.json()["choices"][0]["text"]


def test_until_stop_keeps_the_tokens_up_to_the_one_completing_the_stop_string():
    """"f", the stop string, ends 6 characters in: the 6th token ends the generation, as a stop would have."""
    tokenizer = char_tokenizer()
    ids = tokenizer("abcdefgh").input_ids
    stats = GenerationStats(1, [Step(ids[:4], 3, 0.001), Step(ids[4:], 3, 0.001)])
    # the second step's accepted drafts are cut to the 2 tokens kept
    assert until_stop(stats, TextStream(tokenizer), 6).steps == [Step(ids[:4], 3, 0.001),
                                                                 Step(ids[4:6], 2, 0.001, "stop")]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_given_as_a_string_is_one_stop_string(client, stream):
    """OpenAI's `stop` is a string or a list of them: a string is one stop string, not one per character."""
    body = {"prompt": "x", "max_tokens": CAP, "stream": stream}
    assert complete(client, {**body, "stop": "de"})[:2] == ("abc", "stop")
    assert complete(client, {**body, "stop": "dx"})[:2] == (ANSWER[:CAP], "length")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_limit_of_0_tokens_is_refused(client, field):
    """An answer has at least one token."""
    body = {"messages": [{"role": "user", "content": "x"}], field: 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_a_list_of_no_prompt_is_refused(client):
    response = client.post("/v1/completions", json={"prompt": []})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "give one prompt per request, got 0"


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_inside_a_character_ends_with_its_text(stream):
    """One token per byte: an answer that max_tokens cuts inside "😀" ends with the text its tokens decode
    to (U+FFFD for the cut character), not without it, as that text was held back for the rest to come."""
    from test_evaluation import byte_tokenizer

    tokenizer = byte_tokenizer()
    runner = ChatRunner(ScriptedModel("ab😀c", tokenizer), "plain")
    with TestClient(create_app(runner, "scripted", CAP)) as client:
        for speculative in (True, False):
            body = {"prompt": "q", "max_tokens": 4, "speculative": speculative, "stream": stream}
            text, reason, _ = complete(client, body)
            assert (text, reason) == (tokenizer.decode(tokenizer("ab😀").input_ids[:4]), "length")
            assert text.endswith("\ufffd")


def test_a_chat_streams_last_chunk_without_text_has_an_empty_delta(client):
    """As OpenAI's: the chunk that only ends the answer (here at the stop string, one token a step) has no content."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": CAP, "stop": ["d"], "speculative": False,
            "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as events:
        data = [line[6:] for line in events.iter_lines() if line.startswith("data: {")]
    assert json.loads(data[-1])["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


def test_a_body_of_exactly_the_request_limit_is_read(model):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    with TestClient(create_app(ChatRunner(model), "scripted", CAP, max_request_bytes=len(body))) as client:
        response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200
