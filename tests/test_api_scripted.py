"""The HTTP API's own rules, in process, over a scripted model: it answers
every prompt with the same text, one token per step in plain decoding and
STEP tokens per step (accepted drafts) in speculative decoding, so each rule
is checked in both modes in milliseconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from test_api import char_tokenizer

from application.api_server import create_app
from application.common import ChatRunner
from eagle_gto.acceptance import SamplingParams, target_probs
from eagle_gto.generation import Step

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

    def __init__(self):
        self.tokenizer = char_tokenizer()
        self.tokenizer.chat_template = ALTERNATING
        self.calls = []  # each generation's options

    def generate_steps(self, input_ids, *, max_new_tokens, speculative, **options):
        self.calls.append(dict(options, max_new_tokens=max_new_tokens))
        tokens = self.tokenizer(ANSWER).input_ids[:max_new_tokens]
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


def complete(client, body: dict) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of a completion, streamed or not."""
    if not body.get("stream"):
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        return answer["choices"][0]["text"], answer["choices"][0]["finish_reason"], answer["usage"]
    text, reason, usage = "", None, None
    with client.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as events:
        for line in events.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    text, reason = text + choice["text"], choice["finish_reason"] or reason
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
