"""The OpenAI-compatible HTTP API, driven by the official `openai` client
against `python -m application.api_server` started here on a loopback port
with a tiny random model pair.

Expected answers come from the engine itself: a greedy answer must be the
text of `eagenerate`'s tokens for the same prompt (speculative decoding is
lossless, so plain decoding must give it too), whatever else the server is
doing at the same time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import torch

from application.chat_runner import GenerationOptions
from eagle_gto import EaModel
from eagle_gto.chat import build_prompt, encode_prompt

REPO = Path(__file__).resolve().parents[1]
TREE = dict(total_token=16, depth=4, top_k=4)  # small, so tests run fast; answers do not depend on it
MAX_LENGTH = 2048
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # the tiny tokenizer: one token per character


def char_tokenizer():
    """One token per character: every token decodes to visible text, so
    answers compare exactly as strings."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def save_tiny_pair(folder: Path, arch: str = "llama", **config_fields) -> tuple[Path, Path]:
    """A tiny random Llama (or `arch`) with the one-character-per-token
    tokenizer and a random EAGLE-3 head, saved the way real checkpoints are."""
    from transformers import AutoModelForCausalLM

    from eagle_gto.checkpoint import save_head
    from eagle_gto.tiny import base_config, head_config, random_head

    config = base_config(arch, vocab_size=len(CHARS))
    config.update(config_fields)
    torch.manual_seed(0)
    base, head = folder / "base", folder / "head"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    save_head(random_head(head_config(config, "eagle3", draft_vocab_size=64), seed=1), head)
    return base, head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(module: str, pair: tuple[Path, Path], folder: Path, ready_path: str, *extra: str) -> Iterator[str]:
    """`python -m module` on a free loopback port with the pair, up once
    `ready_path` answers 200; yields its base URL and stops it afterwards.
    Its output goes to folder/server.log (a pipe nobody reads could fill up
    and stall the server)."""
    port, log = free_port(), folder / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", module, "--base-model-path", str(pair[0]), "--ea-model-path", str(pair[1]),
               "--port", str(port), *(f"--{k.replace('_', '-')}={v}" for k, v in TREE.items()), *extra]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url + ready_path, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_until_up(server: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server did not answer {url} within {timeout} s")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    with running_server("application.api_server", pair, tmp_path_factory.mktemp("api"), "/health",
                        "--max-length", str(MAX_LENGTH), "--max-new-tokens", "2000") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    # No retries: a failed request must show up as a failure, not be hidden by a second try.
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(pair):
    return EaModel.from_pretrained(*map(str, pair), dtype=torch.float32, **TREE)


@pytest.fixture(scope="module")
def name(pair):
    return str(pair[0])


def expected_answer(engine, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    out = engine.eagenerate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, max_length=MAX_LENGTH)
    new = out[0, len(prompt_ids):].tolist()
    return engine.tokenizer.decode(new, skip_special_tokens=True), len(new)


def chat_ids(engine, messages) -> list[int]:
    return encode_prompt(build_prompt(messages, "auto", engine.tokenizer), engine.tokenizer, "auto")


def ask(client, name, prompt: str, max_tokens: int, *, chat: bool, stream: bool, speculative: bool = True,
        **options) -> tuple[str, str, dict | None]:
    """(text, finish_reason, speculative_stats) of one request."""
    args = dict(model=name, max_tokens=max_tokens, temperature=options.pop("temperature", 0.0),
                extra_body={"speculative": speculative}, stream=stream, **options)
    api = client.chat.completions if chat else client.completions
    if chat:
        args["messages"] = [{"role": "user", "content": prompt}]
    else:
        args["prompt"] = prompt
    if not stream:
        response = api.create(**args)
        choice = response.choices[0]
        return (choice.message.content if chat else choice.text), choice.finish_reason, response.speculative_stats
    text, reason, stats = "", None, None
    for chunk in api.create(**args):
        if chunk.choices:
            choice = chunk.choices[0]
            text += (choice.delta.content or "") if chat else choice.text
            reason = choice.finish_reason or reason
        stats = getattr(chunk, "speculative_stats", None) or stats
    return text, reason, stats


def test_models_and_health(client, server, name):
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).id == name  # a folder: its slashes are in the URL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"
    assert httpx.get(server + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_eagenerate(client, engine, name, stream):
    prompt = "def fibonacci(n):\n"
    ids = engine.tokenizer(prompt).input_ids
    expected, count = expected_answer(engine, ids, 40)
    response = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0,
                                         stream=stream, stream_options={"include_usage": True} if stream else None)
    if stream:
        chunks = list(response)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        usage, stats = chunks[-1].usage, next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        stats = stats.speculative_stats
    else:
        text, usage, stats = response.choices[0].text, response.usage, response.speculative_stats
    assert text == expected
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), count, len(ids) + count)
    assert stats["speculative"] is True
    assert 1 <= stats["iterations"] <= count
    assert stats["mean_accepted_length"] == pytest.approx(count / stats["iterations"], abs=1e-3)
    assert stats["tokens_per_second"] > 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("speculative", [True, False])
def test_chat_equals_eagenerate(client, engine, name, stream, speculative):
    """The chat prompt is the model type's template over the messages, and
    plain decoding gives the same greedy answer with exactly one token per
    iteration."""
    messages = [{"role": "user", "content": "class Stack:"}]
    expected, count = expected_answer(engine, chat_ids(engine, messages), 30)
    text, reason, stats = ask(client, name, "class Stack:", 30, chat=True, stream=stream, speculative=speculative)
    assert text == expected
    assert reason == "length"
    assert stats["speculative"] is speculative
    if not speculative:
        assert stats["iterations"] == count and stats["mean_accepted_length"] == 1.0


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_answer(client, engine, name, stream):
    prompt = "import os\n"
    full, _ = expected_answer(engine, engine.tokenizer(prompt).input_ids, 40)
    stop = full[6:9]  # some text from the middle of the greedy answer
    text, reason, _ = ask(client, name, prompt, 40, chat=False, stream=stream, stop=[stop, "never-there"])
    assert (text, reason) == (full[: full.index(stop)], "stop")


def test_concurrent_clients_get_the_answers_they_get_alone(client, name):
    """8 clients x 5 requests at once, mixing chat and completions, streaming
    and not, speculative and plain, greedy and seeded sampling: each answer
    equals the one the same request got with the server to itself."""
    prompts = [f"def f{i}(x):\n    return x {'+-*/%'[i % 5]}" for i in range(8)]

    def request(i: int, j: int) -> tuple[str, str]:
        k = i * 5 + j
        sampled = k % 4 == 3
        options = dict(temperature=0.9, seed=k) if sampled else {}
        return ask(client, name, prompts[(i + j) % len(prompts)], 10, chat=k % 2 == 0, stream=k % 3 != 0,
                   speculative=k % 5 != 4, **options)[:2]

    alone = {(i, j): request(i, j) for i in range(8) for j in range(5)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        clients = [pool.submit(lambda i=i: [request(i, j) for j in range(5)]) for i in range(8)]
        together = {(i, j): answer for i, future in enumerate(clients)
                    for j, answer in enumerate(future.result(timeout=240))}
    assert together == alone
    assert all(text for text, _ in alone.values())


def test_client_disconnect_frees_the_model(client, server, name):
    """A client that drops a long stream must not hold the model: 2000
    tokens take the server tens of seconds, yet it is free within seconds."""
    body = {"model": name, "prompt": "x = ", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: dropping it would close the stream here already
        assert next(line for line in lines if line.startswith("data:"))
        assert httpx.get(server + "/health").json()["busy"] is True
    deadline = time.monotonic() + 5
    while httpx.get(server + "/health").json()["busy"]:
        assert time.monotonic() < deadline, "the dropped stream still holds the model"
        time.sleep(0.05)
    text, reason, _ = ask(client, name, "y = ", 5, chat=False, stream=False)
    assert reason == "length" and text


BAD_REQUESTS = [
    # (endpoint, body, status, param, code)
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', 400, None, None),
    ("chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature",
     None),
    ("chat/completions", {"max_tokens": 5}, 400, "messages", None),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_LENGTH}]}, 400, "messages",
     "context_length_exceeded"),
    ("completions", {"prompt": "x" * MAX_LENGTH}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("chat/completions", {"messages": [{"role": "system", "content": ""}]}, 400, "messages", None),
    ("completions", {"prompt": "hi", "n": 2}, 400, "n", None),
    ("completions", [1, 2], 400, None, None),
    ("completions", {"prompt": "hi", "seed": 2**70}, 400, "seed", None),
    ("completions", {"prompt": "hi", "seed": -2**70, "stream": True}, 400, "seed", None),
    ("completions", {"prompt": "hi", "top_p": -0.1}, 400, "top_p", None),
    ("completions", {"prompt": 5}, 400, "prompt", None),  # the field, not the union branch ("prompt.str")
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", None),
]


@pytest.mark.parametrize("endpoint,body,status,param,code", BAD_REQUESTS)
def test_bad_request_gets_an_openai_error(server, endpoint, body, status, param, code):
    raw = body if isinstance(body, bytes) else None
    response = httpx.post(f"{server}/v1/{endpoint}", content=raw, json=None if raw else body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


def test_server_still_serves_after_bad_requests(client, name):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert info.value.status_code == 400
    text, reason, _ = ask(client, name, "hi", 4, chat=True, stream=True)
    assert reason == "length" and text


def test_engine_switches_reach_the_model(monkeypatch):
    """--no-cuda-graphs and --torch-compile are passed to from_pretrained (defaults: graphs auto, no compile)."""
    from application import server_options

    seen = []
    monkeypatch.setattr(server_options.EaModel, "from_pretrained", lambda *args, **kwargs: seen.append(kwargs))
    parser = server_options.build_parser("test", "", 0)
    server_options.load_model(parser.parse_args([]))
    server_options.load_model(parser.parse_args(["--no-cuda-graphs", "--torch-compile"]))
    server_options.load_model(parser.parse_args(["--torch-compile", "max-autotune-no-cudagraphs"]))
    assert [(s["cuda_graphs"], s["torch_compile"]) for s in seen] == \
        [(None, False), (False, "default"), (None, "max-autotune-no-cudagraphs")]


def test_the_reference_web_uis_command_line(monkeypatch):
    """The reference web UI's options and spellings: --model-type llama-3-instruct/llama-2-chat,
    --max-new-token, --load-in-8bit/--load-in-4bit (one of them), --no-eagle3."""
    from application import server_options

    seen = []
    monkeypatch.setattr(server_options.EaModel, "from_pretrained", lambda *args, **kwargs: seen.append(kwargs))
    parser = server_options.build_parser("test", "", 0)
    args = parser.parse_args(["--model-type", "llama-3-instruct", "--max-new-token", "300", "--load-in-8bit",
                              "--no-eagle3", "--total-token", "50"])
    assert (args.model_type, args.max_new_tokens) == ("llama3", 300)
    server_options.load_model(args)
    server_options.load_model(parser.parse_args(["--model-type", "llama-2-chat", "--load-in-4bit"]))
    assert [(s["load_in_8bit"], s["load_in_4bit"], s["use_eagle3"], s["total_token"]) for s in seen] == \
        [(True, False, False, 50), (False, True, None, 60)]
    assert parser.parse_args(["--model-type", "llama-2-chat"]).model_type == "llama2-chat"
    for wrong in (["--load-in-8bit", "--load-in-4bit"], ["--model-type", "llama-3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(wrong)


@pytest.mark.parametrize("device_map,dtype", [(None, torch.float16), ("cuda:0", torch.float16),
                                              ("none", torch.float32), ("cpu", torch.float32)])
def test_auto_dtype_follows_the_device_map(monkeypatch, device_map, dtype):
    """The demo base's float16 where the device map puts the model on CUDA, float32 where it stays on the CPU,
    GPU or not."""
    from application import server_options

    seen = []
    monkeypatch.setattr(server_options.EaModel, "from_pretrained", lambda *args, **kwargs: seen.append(kwargs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parser = server_options.build_parser("test", "", 0)
    server_options.load_model(parser.parse_args([] if device_map is None else ["--device-map", device_map]))
    assert seen[0]["dtype"] == dtype


@pytest.fixture(scope="module")
def sliding_pair(tmp_path_factory):
    """A tiny Mixtral attending within a sliding window of 64 tokens."""
    return save_tiny_pair(tmp_path_factory.mktemp("sliding"), "mixtral", sliding_window=64)


BAD_OPTIONS = [
    # (options, the error message); "{pair}" and "{sliding}": the base and head folders of those pairs
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive number of tokens, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be a positive number of tokens, got -5"),
    (["--max-length", "-1"], "--max-length must be a positive number of tokens, got -1"),
    (["--base-model-path", "/no/such/base", "--ea-model-path", "/no/such/head"], "no such folder"),
    (["--base-model-path", "{pair}"], "give both --base-model-path and --ea-model-path, or neither"),
    (["{sliding}", "--total-token", "16", "--depth", "4", "--top-k", "4", "--max-length", "65"],
     "sliding-window attention (window 64); the engine's tree mask is full attention, so max_length must be <= 64, "
     "got 65"),
    (["--port", "70000"], "argument --port: a port is a number from 0 to 65535, got 70000"),
    (["--port", "65536"], "argument --port: a port is a number from 0 to 65535, got 65536"),  # one past the last
    (["--port", "http"], "argument --port: a port is a number from 0 to 65535, got http"),  # not port 0 (any)
    (["{busy}"], "cannot listen on 127.0.0.1:"),  # a port another program listens on: found before the model loads
    (["{both}", "--max-length", str(10**13)], "max_length=10000000000000 needs "),  # more than all the memory
]


@pytest.mark.parametrize("module", ["api_server", "webui"])
@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_options_no_request_could_run_with_stop_the_server(pair, sliding_pair, capsys, monkeypatch, module, options,
                                                           message):
    """At startup, with an error message and no traceback, rather than a server that fails every request."""
    import importlib

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("uvicorn.run", serve)
    monkeypatch.setattr("gradio.Blocks.launch", serve)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        pairs = {"{pair}": [str(pair[0])],
                 "{both}": ["--base-model-path", str(pair[0]), "--ea-model-path", str(pair[1])],
                 "{sliding}": ["--base-model-path", str(sliding_pair[0]), "--ea-model-path", str(sliding_pair[1])],
                 "{busy}": ["--port", str(busy.getsockname()[1])]}
        argv = [arg for option in options for arg in pairs.get(option, [option])]
        if "--port" not in argv:  # any free one: the servers' default ports may be taken on this machine
            argv += ["--port", "0"]
        with pytest.raises(SystemExit) as info:
            importlib.import_module(f"application.{module}").main(argv)
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    last = error.splitlines()[-1]
    assert last.startswith(f"python -m application.{module}: error: ") and message in last


def test_a_format_stop_token_past_the_model_vocabulary_stops_the_server_at_startup(tmp_path, capsys):
    """A tokenizer with Qwen's <|im_end|> added past the model's rows: the engine refused every request."""
    from transformers import AutoTokenizer

    from application import server_options

    base, head = save_tiny_pair(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tokenizer.save_pretrained(base)
    parser = server_options.build_parser("test", "", 0)
    options = ["--base-model-path", str(base), "--ea-model-path", str(head), "--total-token", "16", "--depth", "4",
               "--top-k", "4", "--max-length", "64"]
    with pytest.raises(SystemExit) as info:
        server_options.load_runner(parser, parser.parse_args([*options, "--model-type", "qwen"]))
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"test: error: the qwen format's stop token ids [{len(CHARS)}] lie outside the model's vocabulary "
        f"[0, {len(CHARS)}): is the tokenizer this model's?")
    vicuna = server_options.load_runner(parser, parser.parse_args([*options, "--model-type", "vicuna"]))
    assert vicuna.stop_token_ids == []


def test_caches_that_do_not_fit_are_one_line_of_the_first_line_of_the_error(pair, capsys, monkeypatch):
    """An out-of-memory error may go on over more lines (advice on allocator settings): the server's last word
    before exiting stays one line."""
    from application import server_options

    def out_of_memory(runner):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.\nIf reserved but unallocated "
                                     "memory is large try setting PYTORCH_CUDA_ALLOC_CONF")

    monkeypatch.setattr(server_options.ChatRunner, "make_caches", out_of_memory)
    parser = server_options.build_parser("test", "", 0)
    args = parser.parse_args(["--base-model-path", str(pair[0]), "--ea-model-path", str(pair[1]),
                              "--total-token", "16", "--depth", "4", "--top-k", "4", "--max-length", "64"])
    with pytest.raises(SystemExit) as info:
        server_options.load_runner(parser, args)
    assert info.value.code == 2
    error = capsys.readouterr().err  # (after transformers' progress bar)
    assert error.splitlines()[-1] == ("test: error: the caches of a context of 64 tokens (--max-length) do not fit "
                                      "in memory: CUDA out of memory. Tried to allocate 8.00 GiB.")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in error


@pytest.mark.parametrize("port", ["0", "65535"])
def test_the_ends_of_the_port_range_are_ports(port):
    from application.server_options import build_parser

    assert build_parser("test", "", 8000).parse_args(["--port", port]).port == int(port)


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEADDR's rules for TIME_WAIT are Linux's")
def test_a_port_a_stopped_server_left_connections_waiting_on_is_free():
    """A restarted server finds its port's closed connections in TIME_WAIT for a minute; uvicorn binds over them
    (SO_REUSEADDR, set by the stopped server too), so the check before loading must not refuse the port."""
    from application.server_options import build_parser, check_address

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            connection, _ = server.accept()
            connection.close()  # the server's side closes first: it waits in TIME_WAIT
    check_address(build_parser("test", "", 8000), "127.0.0.1", port)  # (exits when it cannot listen there)


@pytest.mark.parametrize("max_length", [[], ["--max-length", "40"]])
def test_a_sliding_window_model_serves_within_its_window(sliding_pair, max_length):
    """The startup check lets through a --max-length within the window; without
    one, the window is the context (not 2048), for the servers and for eagenerate."""
    from application.server_options import build_parser, load_runner

    parser = build_parser("test", "", 0)
    args = parser.parse_args(["--base-model-path", str(sliding_pair[0]), "--ea-model-path", str(sliding_pair[1]),
                              "--total-token", "16", "--depth", "4", "--top-k", "4", *max_length])
    runner = load_runner(parser, args)
    assert runner.max_length == (40 if max_length else 64)
    updates = list(runner.generate(runner.text_prompt("def f(x):"), GenerationOptions(max_new_tokens=8)))
    assert updates[-1].stats.new_tokens == 8
    out = runner.model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=100)
    assert out.shape[1] == 64 and runner.model.last_stats.finish_reason == "length"


def test_the_servers_prepare_the_step_graphs_of_greedy_requests_at_startup(pair, monkeypatch, capsys):
    """With CUDA graphs (here a stand-in that runs each step eagerly and
    records its key), every graph greedy requests replay is recorded while
    the server starts: requests of any length, speculative or plain, record none."""
    import eagle_gto.ea_model as ea_model
    import eagle_gto.generation as generation
    from application.server_options import build_parser, load_runner

    keys = []

    class RecordingGraphs:
        def __init__(self, device=None, max_graphs: int = 64):
            pass

        def run(self, key, step):
            keys.append(key)
            return step()

    monkeypatch.setattr(ea_model, "StepGraphs", RecordingGraphs)
    monkeypatch.setattr(generation, "VIEW_BUCKET", 16)  # several views within a context of 64
    monkeypatch.setattr(ea_model.EaModel, "_check_graphs", lambda self, wanted: True)
    parser = build_parser("test", "", 0)
    args = parser.parse_args(["--base-model-path", str(pair[0]), "--ea-model-path", str(pair[1]),
                              "--total-token", "16", "--depth", "4", "--top-k", "4", "--max-length", "64"])
    runner = load_runner(parser, args)
    assert "preparing the decoding steps" in capsys.readouterr().out
    warmed = set(keys)
    keys.clear()
    for speculative in (True, False):
        for prompt in ("def f(x):", "a long prompt, " * 3):
            list(runner.generate(runner.text_prompt(prompt), GenerationOptions(64, speculative=speculative)))
    assert len(set(keys)) >= 4 and set(keys) <= warmed
