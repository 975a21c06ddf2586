"""The Gradio web UI in a real browser: headless Debian Chromium driven by
Playwright against `python -m application.webui` started here on a loopback
port with a tiny random model pair (the one test_api.py builds).

The expected answer of a message is the text of `eagenerate`'s greedy tokens
for the same prompt; the UI must show exactly that, streamed, with its speed
figures, for one user or for two users sharing the model."""

from __future__ import annotations

import functools
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pytest
import torch
from playwright import sync_api
from test_api import TREE, free_port, running_server, save_tiny_pair
from test_api_scripted import ScriptedModel

from application import webui
from application.chat_runner import ChatRunner
from application.webui import CONTEXT_FULL, DONE, GENERATING, STOPPED, WAITING, answer_limit, build_ui
from eagle_gto import EaModel

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("the browser test needs Debian's Chromium at /usr/bin/chromium "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)

MAX_LENGTH = 1024
MAX_NEW = 24  # tokens per answer in these tests
SPEED = re.compile(r"[\d.]+ tokens/s · mean accepted length [\d.]+ tokens/iteration · "
                   r"(\d+) tokens? in (\d+) iterations?")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def url(pair, tmp_path_factory):
    with running_server("application.webui", pair, tmp_path_factory.mktemp("webui"), "/",
                        "--max-length", str(MAX_LENGTH), "--max-new-tokens", "1000") as base:
        yield base + "/"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def expected(pair):
    """The greedy answer the engine gives a message, as text."""
    model = EaModel.from_pretrained(*map(str, pair), dtype=torch.float32, **TREE)

    def answer(message: str, max_new_tokens: int = MAX_NEW) -> str:
        ids = model.tokenizer(message).input_ids  # plain model type: the conversation is the text itself
        out = model.eagenerate(torch.tensor([ids]), max_new_tokens=max_new_tokens, max_length=MAX_LENGTH)
        return model.tokenizer.decode(out[0, len(ids):].tolist())

    return answer


def open_chat(browser, url: str, max_new: int = MAX_NEW):
    """A new page in its own session, with the answer length set."""
    page = browser.new_context(viewport={"width": 1100, "height": 1100}).new_page()
    page.goto(url)
    box = page.locator("#max-new-tokens input[type=number]")
    box.fill(str(max_new))
    box.press("Enter")
    return page


def send(page, message: str, how: str = "click") -> None:
    """Type and send the message: click Send, or press Shift+Enter (the submit key of a multi-line box)."""
    page.locator("#message textarea").fill(message)
    if how == "click":
        page.locator("#send").click()
    else:
        page.locator("#message textarea").press(how)


def stats(page) -> str:
    return page.locator("#stats").inner_text()


def answers(page) -> list[str]:
    return [code.text_content() for code in page.locator('[data-testid="bot"] pre code').all()]


def settled_answers(page, expect: list[str] | None = None, timeout: float = 20) -> list[str]:
    """The answers once the chat has drawn them. The chatbot renders its Markdown on its own schedule, so
    just after the notice line says the answer ended it can still show an earlier step. Waits until they
    equal `expect`, or, without it, until they stay the same for a second; returns what is shown then."""
    deadline = time.monotonic() + timeout
    shown, since = answers(page), time.monotonic()
    while shown != expect and time.monotonic() < deadline:
        if expect is None and time.monotonic() - since >= 1:
            break
        time.sleep(0.1)
        now = answers(page)
        if now != shown:
            shown, since = now, time.monotonic()
    return shown


def wait_for_answer(page, count: int = 1) -> None:
    """Until the chat shows `count` answers, the last one streaming. "Generating…" shows from Send, before
    the answer's first step: a Stop then takes the question back instead of stopping an answer."""
    page.wait_for_function(f"document.querySelectorAll('[data-testid=\"bot\"]').length == {count}")


def state(page) -> str:
    return page.locator("#notice").inner_text()


def wait_for_state(page, word: str, timeout: float = 120) -> None:
    try:
        page.wait_for_function(f"document.querySelector('#notice').innerText.includes({word!r})",
                               timeout=timeout * 1000)
    except sync_api.TimeoutError:
        pytest.fail(f"no {word!r} within {timeout} s; the page says {state(page)!r} / {stats(page)!r}")


# Records, in the browser, every text the last answer and the speed figures show, as they render.
RECORD = """() => {
    window.shown = [];
    new MutationObserver(() => {
        const codes = document.querySelectorAll('[data-testid="bot"] pre code');
        const stats = document.querySelector('#stats').innerText;
        if (codes.length) window.shown.push([codes[codes.length - 1].textContent, stats]);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


# What the user would hit at the centre of the element: the element itself, or the HTML of what covers it.
# One script run, so a renderer busy drawing a streaming answer cannot time it out (a trial click can).
COVERED_BY = """(selector) => {
    const element = document.querySelector(selector);
    element.scrollIntoView({block: 'center'});
    const box = element.getBoundingClientRect();
    const hit = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
    return hit && (hit === element || element.contains(hit)) ? null : (hit ? hit.outerHTML.slice(0, 300) : 'nothing');
}"""


def press(page, selector: str) -> None:
    """Click a button while an answer streams, as the user would: nothing covers it, and the click comes at
    once. Playwright's click waits for animation frames first, and a renderer busy drawing a long answer on
    a loaded machine can hold those back until the answer has ended."""
    cover = page.evaluate(COVERED_BY, selector)
    assert cover is None, f"{selector} is covered by {cover}"
    page.evaluate("(selector) => document.querySelector(selector).click()", selector)


def wait_for_error(page, text: str) -> None:
    """The error's toast or notice line, and no Gradio error badge over the chat blocking the message box."""
    page.get_by_text(text).first.wait_for(timeout=60_000)
    assert "Error" not in page.locator("#chatbot").inner_text()
    cover = page.evaluate(COVERED_BY, "#message textarea")
    assert cover is None, f"the message box is covered by {cover}"


def on_chat(update: dict) -> list[dict]:
    """The messages of a chatbot update from the UI's actions, each with the Markdown the chat shows."""
    return [{"role": m["role"], "content": m["content"]["text"]} for m in update["value"]]


def test_answer_streams_with_speed_figures(browser, url, expected, tmp_path):
    """The answer grows step by step while the speed figures update, and
    ends as exactly the greedy answer; plain decoding gives the same text at
    one token per iteration."""
    page = open_chat(browser, url, max_new=64)
    page.evaluate(RECORD)
    send(page, "def fibonacci(n):")
    wait_for_state(page, "Done")
    final = expected("def fibonacci(n):", 64)
    assert settled_answers(page, [final + "\n"]) == [final + "\n"]
    shown = page.evaluate("window.shown")
    partial = {text for text, _ in shown if len(text) <= len(final)}  # a code block ends with a newline
    assert all(final.startswith(text[:-1]) for text in partial)
    assert len(partial) >= 3, "the answer did not stream"
    assert len({figures for _, figures in shown if "tokens/s" in figures}) >= 3, "the speed figures did not update"
    tokens, iterations = map(int, SPEED.search(stats(page)).groups())
    assert tokens == 64 and 1 <= iterations <= tokens and "speculative decoding" in stats(page)
    assert page.locator("#drafts pre").text_content() == final
    assert state(page) == answer_limit(64)
    page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)

    page.locator('#chatbot button[aria-label="Clear"]').click()  # the chatbot's trash icon clears the history too
    page.wait_for_function("document.querySelectorAll('[data-testid=\"bot\"]').length == 0")
    page.locator("#speculative input").uncheck()
    send(page, "def fibonacci(n):")
    wait_for_state(page, "Done")
    line = stats(page)
    assert "plain decoding" in line and "mean accepted length 1.00" in line
    # nothing of the cleared conversation in the prompt:
    assert settled_answers(page, [final + "\n"]) == [final + "\n"]


def test_regenerate_gives_the_greedy_answer_again(browser, url, expected):
    page = open_chat(browser, url)
    send(page, "class Stack:")
    wait_for_state(page, "Done")
    page.locator("#regenerate").click()
    page.wait_for_function("!document.querySelector('#notice').innerText.includes('Done')")
    wait_for_state(page, "Done")
    answer = [expected("class Stack:") + "\n"]
    assert settled_answers(page, answer) == answer


def test_bad_input_shows_an_error_and_the_server_keeps_serving(browser, url, expected):
    page = open_chat(browser, url)
    page.locator("#send").click()
    wait_for_error(page, "The message is empty")
    page.locator("#regenerate").click()
    wait_for_error(page, "There is no message to answer again")
    send(page, "x" * (MAX_LENGTH + 10))
    wait_for_error(page, "too many for the context")
    assert page.locator('[data-testid="user"]').count() == 0  # the turn that failed was taken back
    send(page, "import os")
    wait_for_state(page, "Done")
    answer = [expected("import os") + "\n"]
    assert settled_answers(page, answer) == answer


def test_a_failed_action_leaves_the_conversation_as_it_was(browser, url):
    """A question that leaves less room than a draft tree: plain decoding fills
    the context, and so does Regenerate with speculative decoding (its last
    tokens one at a time), with the same greedy answer. A Send that no
    longer fits then fails and keeps the question, its answer, the typed
    text, the answer's speed figures and the draft panel."""
    page = open_chat(browser, url, max_new=20)
    page.locator("#speculative input").uncheck()
    send(page, "x" * (MAX_LENGTH - 10))
    wait_for_state(page, CONTEXT_FULL.format(MAX_LENGTH))  # before the 20 tokens asked for
    plain = settled_answers(page)
    page.locator("#speculative input").check()
    page.locator("#regenerate").click()
    full = CONTEXT_FULL.format(MAX_LENGTH)
    page.wait_for_function(f"!document.querySelector('#notice').innerText.includes({full!r})")
    wait_for_state(page, full)
    assert settled_answers(page, plain) == plain and "plain decoding" not in stats(page)
    before = answers(page), stats(page), page.locator("#drafts").inner_text()
    send(page, "y" * 20)
    wait_for_error(page, "(one more is needed for the answer)")
    now = answers(page), stats(page), page.locator("#drafts").inner_text()
    assert (page.locator('[data-testid="user"]').count(), now) == (1, before)
    # the typed text back in the box, by the page's step once the answer has ended (see webui.GIVE_BACK)
    page.wait_for_function(f"document.querySelector('#message textarea').value === {'y' * 20!r}")


def test_queued_user_waits_and_stop_frees_the_model(browser, url, expected):
    """While one user's long answer is generating, a second user is told to
    wait (Stop there takes the question back into the message box); Stop
    ends the first answer early and the second then gets its answer,
    unaffected by the first. Clear during an answer clears for good."""
    first = open_chat(browser, url, max_new=1000)
    send(first, "while True:")
    wait_for_state(first, "Generating")
    wait_for_answer(first)
    second = open_chat(browser, url)
    send(second, "for i in range(10):")
    wait_for_state(second, "Waiting for the model", timeout=30)
    press(second, "#stop")
    wait_for_state(second, "Stopped", timeout=30)
    assert second.locator('[data-testid="user"]').count() == 0
    assert second.locator("#message textarea").input_value() == "for i in range(10):"
    second.locator("#send").click()
    wait_for_state(second, "Waiting for the model", timeout=30)
    press(first, "#stop")
    wait_for_state(first, "Stopped", timeout=30)
    wait_for_state(second, "Done", timeout=60)
    time.sleep(0.5)  # a step of the stopped answer still on its way would show now
    assert state(first) == "Stopped."
    assert int(SPEED.search(stats(first)).group(1)) < 1000
    answer = [expected("for i in range(10):") + "\n"]
    assert settled_answers(second, answer) == answer

    send(first, "while True:")  # the second answer of this conversation: wait until it streams
    wait_for_answer(first, 2)
    press(first, "#clear")
    first.wait_for_function("document.querySelectorAll('[data-testid=\"user\"]').length == 0")
    time.sleep(0.5)  # the cancelled answer's last step, still on its way, must not bring it back
    assert (first.locator('[data-testid="user"]').count(), stats(first), state(first)) == (0, "", "")
    first.locator("#regenerate").click()
    wait_for_error(first, "There is no message to answer again")


def test_stop_after_the_answer_ended_keeps_its_end_line():
    """Called directly (no browser): Stop pressed while the page still says Generating…, as the answer has ended
    (its last update on its way, or dropped by the page as Stop cancels its event): the page gets the end line,
    not "Stopped.", the whole answer, and its speed figures and draft panel (the page may show an earlier step's)."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, 8)
    history, pending, ended = last[0], last[1], last[2]  # the session's states, as the server keeps them
    notice, chat, _, figures, panel, *_ = actions["stopped"](GENERATING, history, pending, ended, "")
    assert (notice, on_chat(chat)[-1]["content"]) == (answer_limit(8), "abcdefgh")
    assert "8 tokens in 2 iterations" in figures.replace("**", "") and (figures, panel) == (last[4], last[5])


@pytest.mark.parametrize("first,second", [("click", "click"), ("Shift+Enter", "click"), ("click", "Shift+Enter")])
def test_one_turn_at_a_time(browser, url, first, second):
    """Sending while the conversation's answer streams is refused, whichever way either message was sent
    (each way is its own chain of events): the typed text stays in the box and the answer goes on. Sent
    once the answer has ended (here: stopped), the message is answered after the answer as it was shown."""
    page = open_chat(browser, url, max_new=1000)
    send(page, "while True:", first)
    wait_for_state(page, "Generating")
    wait_for_answer(page)
    send(page, "    pass", second)
    wait_for_error(page, "An answer is still being generated")
    assert state(page) == "Generating…"
    assert page.locator("#message textarea").input_value() == "    pass"
    press(page, "#stop")
    wait_for_state(page, "Stopped")
    stopped = settled_answers(page)
    assert len(stopped) == 1 and page.locator('[data-testid="user"]').count() == 1
    box = page.locator("#max-new-tokens input[type=number]")
    box.fill(str(MAX_NEW))
    box.press("Enter")
    page.locator("#send").click()
    wait_for_state(page, "Done")
    both = settled_answers(page)
    assert both[0] == stopped[0] and len(both) == 2
    assert page.locator('[data-testid="user"]').count() == 2


@pytest.mark.parametrize("state", [GENERATING, WAITING], ids=["generating", "waiting"])
def test_no_send_or_regenerate_during_an_answer(state):
    """Called directly (no browser), as the notice line says the conversation's answer is on its way and the
    session has its question pending."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hel"}]
    pending = webui.Question(history[:1], "hi")
    for action, args in (("add_message", ("again", history, state, pending)),
                         ("drop_answer", (history, state, pending))):
        with pytest.raises(gr.Error, match="An answer is still being generated"):
            actions[action](*args)


@pytest.mark.parametrize("action", ["add_message", "drop_answer"])
def test_send_or_regenerate_as_the_answer_ends(action):
    """Called directly (no browser): the page still says Generating… (the answer's last update on its way, or
    dropped as Stop came), but the session has the whole answer: Send and Regenerate start from it."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, 8)
    history, pending = last[0], last[1]  # the session's states, as the server keeps them
    if action == "add_message":
        question, _, notice, *_ = actions["add_message"]("again", history, GENERATING, pending)
        assert (question.asked, question.typed) == (history + [{"role": "user", "content": "again"}], "again")
    else:
        question, _, notice, *_ = actions["drop_answer"](history, GENERATING, pending)
        assert (question.asked, question.typed) == (history[:1], None)
    assert history[-1]["content"] == "abcdefgh" and notice == GENERATING


def test_an_answer_that_stop_or_clear_missed_ends(monkeypatch):
    """Called directly (no browser): the page cancels an answer only once it knows the answer's event, so a Stop
    or Clear pressed just after Send or Regenerate misses it. The question they mark stopped is answered no
    further: an answer on its way ends at its next step, freeing the model, and one not begun does not begin
    (Stop puts the typed text back)."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", 0)
    model = ScriptedModel()
    runner = ChatRunner(model)
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    updates = actions["respond"](pending, [], True, 0, 1, 100)
    history = next(updates)[0]  # the answer is on its way
    notice, chat, _, _, _, left, *_ = actions["stopped"](GENERATING, history, pending, ("", "", ""), "")
    assert (notice, on_chat(chat), left) == (STOPPED, history, None)
    assert list(updates) == [] and not runner.busy
    pending, *_ = actions["add_message"]("again", history, STOPPED, None)
    assert actions["stopped"]("", history, pending, ("", "", ""), "")[2] == "again"  # the page not told of Send yet
    assert list(actions["respond"](pending, history, True, 0, 1, 100)) == []
    pending, *_ = actions["drop_answer"](history, STOPPED, None)
    actions["cleared"](pending)
    assert list(actions["respond"](pending, history, True, 0, 1, 100)) == []
    assert len(model.calls) == 1


def test_an_answers_session_states_change_together():
    """Stop's cancel may come between two outputs of an answer's update (each component's is made in a thread):
    the conversation, its pending question and how it ended are set one after the other with nothing between,
    or Stop as the answer ended found the whole answer with its question still pending ("Stopped." over the
    whole answer, with the figures and draft panel of the step before)."""
    ui = build_ui(ChatRunner(ScriptedModel()), "scripted", 8)
    for answer in (f for f in ui.fns.values() if f.fn and f.fn.__name__ == "respond"):
        states = [n for n, block in enumerate(answer.outputs) if block.stateful]
        assert states == list(range(states[0], states[0] + 3))


def test_clear_before_the_answer_starts():
    """Called directly (no browser): Clear emptied the pending question before its answer began, so the
    answer does not start and bring the conversation back."""
    model = ScriptedModel()
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(model), "scripted", 8).fns.values() if f.fn}
    assert list(actions["respond"](None, [], True, 0, 1, 8)) == []
    assert model.calls == []


def test_max_new_tokens_1():
    """--max-new-tokens 1: the slider still has a range, and answers keep to 1 token (and say so in the singular)."""
    model = ScriptedModel()
    ui = build_ui(ChatRunner(model), "scripted", 1)
    slider = next(b for b in ui.blocks.values() if getattr(b, "elem_id", None) == "max-new-tokens")
    actions = {f.fn.__name__: f.fn for f in ui.fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, slider.maximum)
    assert last[0][-1] == {"role": "assistant", "content": "a"}
    assert model.calls[-1]["max_new_tokens"] == 1
    assert "1 token in 1 iteration ·" in last[4]  # said in the singular
    assert last[6] == "Done: the answer reached its limit of 1 new token (Max new tokens)."


def test_the_next_turn_holds_the_answer_as_the_model_wrote_it():
    """Vicuna writes "ASSISTANT: " before an answer; a byte-level tokenizer decodes the model's " yes"
    with its space: the answer is kept without the format's, or the next prompt would hold two."""
    runner = ChatRunner(ScriptedModel(" yes"), "vicuna")
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 8).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("can you?", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, 8)
    history = last[0]
    assert history[-1] == {"role": "assistant", "content": "yes"}
    written = runner.chat_prompt(history[:1]) + runner.tokenizer(" yes").input_ids
    assert runner.chat_prompt(history + [{"role": "user", "content": "?"}])[:len(written)] == written


@pytest.mark.parametrize("interval", [0, 1e9], ids=["every-step", "first-and-last"])
def test_an_answer_ends_before_the_formats_end_of_turn_written_as_text(monkeypatch, interval):
    """Called directly (no browser): a tokenizer without Qwen's <|im_end|> as one token writes it as text; the
    answer ends before it, as gen_answer's and the API's do, and the model is free again."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", interval)
    runner = ChatRunner(ScriptedModel(" yes<|im_end|>\n<|im_start|>user\nmore"), "qwen")
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("can you?", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, 100)
    assert (last[0][-1], last[6]) == ({"role": "assistant", "content": " yes"}, DONE)
    assert "im_end" not in last[5] and not runner.busy  # the draft panel too


def test_text_held_back_is_shown_with_the_origin_of_its_own_piece(monkeypatch):
    """Called directly (no browser): "<" may start Qwen's <|im_end|> written as text, so it is held back until
    the next piece shows it does not; it then shows as the accepted draft token it was (4 tokens a step, the
    first 3 accepted drafts), not as the target's own token "c" that let it go."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", 0)
    runner = ChatRunner(ScriptedModel("ab<cdefgh"), "qwen")
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, 100)
    assert last[0][-1]["content"] == "ab<cdefgh"
    drafts = last[5]
    assert webui.by_origin("<", True) in drafts and webui.by_origin("c", False) + webui.by_origin("def", True) in drafts


def test_a_chat_template_refusal_shows_its_message():
    """Called directly (no browser): the template's own message, the conversation and typed text as they were."""
    model = ScriptedModel()
    model.tokenizer.chat_template = "{{ raise_exception('This model takes no chats.') }}"
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(model), "scripted", 8).fns.values() if f.fn}
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pending, *_ = actions["add_message"]("again", history, "Done", None)
    updates = actions["respond"](pending, history, True, 0, 1, 8)
    restored = next(updates)
    assert (restored[0], restored[7]) == (history, "again")
    assert "This model takes no chats" in restored[6]  # the notice line; the stats and drafts stay (skipped)
    with pytest.raises(gr.Error, match="This model takes no chats") as error:
        next(updates)
    assert error.value.title == "Chat template error"


def test_a_lone_surrogate_is_the_users_to_fix(caplog):
    """Text that is not Unicode (a browser may send a lone surrogate): said as invalid text, with the typed text
    back, and no traceback logged as if generation had failed."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("cut \ud83d", [], "Done", None)
    updates = actions["respond"](pending, [], True, 0, 1, 8)
    assert next(updates)[7] == "cut \ud83d"
    with pytest.raises(gr.Error, match="lone surrogate") as error:
        next(updates)
    assert error.value.title == "Invalid text"
    assert "generation failed" not in caplog.text


@pytest.mark.parametrize("interval,shown", [(0, 7), (1e9, 2)], ids=["every-step", "first-and-last"])
def test_steps_between_updates_are_shown_together(monkeypatch, interval, shown):
    """Called directly (no browser): an update within UPDATE_INTERVAL of the last waits for the next step,
    so a fast model does not flood the page; the first update says Generating, the last is always shown
    (whole answer, end line), and the history sent with each update is the answer as shown."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", interval)
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 100).fns.values()
               if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    updates = list(actions["respond"](pending, [], True, 0, 1, 100))  # 26 letters, 4 a step: 7 steps
    assert len(updates) == shown
    states = [u[6] for u in updates]
    assert states[0] == GENERATING and states[1:-1] == [gr.skip()] * (shown - 2) and states[-1].startswith("Done")
    texts = [u[0][-1]["content"] for u in updates]
    assert texts[-1] == "abcdefghijklmnopqrstuvwxyz" and all(texts[-1].startswith(t) for t in texts)
    assert [len(t) for t in texts] == sorted({len(t) for t in texts})  # each update shows more


def test_max_new_tokens_stops_at_the_context():
    """No more new tokens on offer than the context holds."""
    ui = build_ui(ChatRunner(ScriptedModel(), max_length=100), "scripted", 1000)
    slider = next(b for b in ui.blocks.values() if getattr(b, "elem_id", None) == "max-new-tokens")
    assert slider.maximum == 99 and "100 tokens" in slider.label  # a prompt holds at least one token


@pytest.mark.parametrize("answer,max_new,line", [(ScriptedModel().answer, 8, answer_limit(8)),
                                                 ("abc", 8, CONTEXT_FULL.format(100))])
def test_the_end_line_names_the_limit_that_ended_the_answer(answer, max_new, line):
    """Called directly (no browser): an answer of exactly Max new tokens ended at its own limit; one that
    ended shorter, with the model's "length", at the context's."""
    ui = build_ui(ChatRunner(ScriptedModel(answer), max_length=100), "scripted", 1000)
    actions = {f.fn.__name__: f.fn for f in ui.fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, max_new)
    assert last[6] == line


@pytest.mark.parametrize("speculative", [True, False])
def test_the_speculative_switch_reaches_the_model(speculative):
    """Called directly (no browser): plain decoding is one token an iteration, and the figures say which."""
    model = ScriptedModel()
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(model), "scripted", 8).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], speculative, 0, 1, 8)
    tokens, iterations = map(int, SPEED.search(last[4].replace("**", "")).groups())
    assert tokens == 8 and (iterations < tokens) is speculative
    assert ("plain decoding" in last[4]) is not speculative


def test_html_in_a_chat_shows_as_written():
    """Called directly (no browser): the chat renders HTML within Markdown (its sanitizer drops <script> and
    its text). The tags a chat model's turns use are the chat's allow_tags, which it shows as written; those its
    Markdown renderer writes itself, comments and entities are escaped outside code; the history keeps the text as
    written, for the next prompt."""
    answer = "Use <b>x</b> &amp; `<i>`\n```\n<p>\n```\n> <Script>y</script> <!-- c --> <p>a < b & c</P>"
    runner = ChatRunner(ScriptedModel(answer))
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, shown, *_ = actions["add_message"]("a <div>", [], "", None)
    assert on_chat(shown)[-1]["content"] == "a &lt;div>" and shown["allow_tags"] == []
    *_, last = actions["respond"](pending, [], True, 0, 1, 100)
    assert last[0][-1]["content"] == answer
    shown = "Use <b>x</b> &amp;amp; `<i>`\n```\n<p>\n```\n> <Script>y</script> &lt;!-- c --> &lt;p>a < b & c&lt;/P>"
    assert on_chat(last[3])[-1]["content"] == shown
    assert last[3]["allow_tags"] == ["b", "i", "script"]


@pytest.mark.parametrize("text,shown", [
    ("para\n    <p>lazy</p>", "para\n    &lt;p>lazy&lt;/p>"),  # a paragraph's continuation, not code
    ("- item\n\n    <p>more</p>", "- item\n\n    &lt;p>more&lt;/p>"),  # the item's second paragraph
    ("para\n\n    <p>code</p>\n<p>", "para\n\n    <p>code</p>\n&lt;p>"),
    ("> ```\n> <p>\n> ```\n<p>", "> ```\n> <p>\n> ```\n&lt;p>"),  # a fence in a quote
    ("```\n<p>", "```\n<p>"),  # a fence that is not closed runs to the end
    ("`a\n\n```\nx\n```\n<p> `", "`a\n\n```\nx\n```\n&lt;p> `"),  # no code span across blocks
    ("`a\n\n<p> `", "`a\n\n&lt;p> `"), ("- `a\n- <p> `", "- `a\n- &lt;p> `"), ("# `a\n<p> `", "# `a\n&lt;p> `"),
    ("`a\n<p> b`", "`a\n<p> b`"),  # a code span across a paragraph's lines
    # The chat reads the escaped Markdown, where an escaped <p> starts no HTML block: the fence after it is code;
    # a tag shown as written by allow_tags does start one, running over the fence to the blank line.
    ("<p>Example:</p>\n~~~\n<p>a &amp; b</p>\n~~~", "&lt;p>Example:&lt;/p>\n~~~\n<p>a &amp; b</p>\n~~~"),
    ("<details>\n~~~\n<p>\n~~~\n\n~~~\n<p>", "<details>\n~~~\n&lt;p>\n~~~\n\n~~~\n<p>"),
    ("<details>\n`<p>`", "<details>\n`&lt;p>`"),  # HTML holds no code span
    ("<div>\n    <p>x</p>", "&lt;div>\n    &lt;p>x&lt;/p>"),  # a paragraph's continuation, not code
    ("a\r```\n<p>\n```\n\nb", "a\r```\n&lt;p>\n```\n\nb"),  # a lone \r is no line break (markdown-it's is)
])
def test_html_is_escaped_where_markdown_reads_it_as_html(text, shown):
    """Called directly: code is where the chat's Markdown renderer finds code (CommonMark's rules)."""
    assert webui.escape_markup(text) == shown


def test_a_fence_shows_once_its_line_has_ended(monkeypatch):
    """Called directly (no browser): the chat's renderer (marked) reads a fence after a paragraph's line only once
    the fence's line has ended, the escaper (CommonMark) at once; while the answer streams, its unfinished last line
    that starts a fence is held back, in a list item or block quote too. The conversation kept has the whole
    answer, and the last update shows it all."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", 0)
    answer = "Use:\n```html\n<p>a</p>\n```\nok\n> - ~~~\nend"
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel(answer)), "scripted", 100).fns.values()
               if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    updates = list(actions["respond"](pending, [], False, 0, 1, 100))  # plain decoding: a character a step
    assert [u[0][-1]["content"] for u in updates] == [answer[:n] for n in range(1, len(answer) + 1)]
    shown = [on_chat(u[3])[-1]["content"] for u in updates]
    assert "Use:\n``" in shown and not {"Use:\n```", "Use:\n```htm"} & set(shown)
    assert shown[shown.index("Use:\n``") + 1:][:6] == ["Use:\n"] * 5 + ["Use:\n```html\n"]  # ```, ```h, ...,
    assert "Use:\n```html\n<p>a</p>\n```" not in shown and "Use:\n```html\n<p>a</p>\n```\n" in shown
    quoted = "Use:\n```html\n<p>a</p>\n```\nok\n"
    assert quoted + "> - ~~" in shown and quoted + "> - ~~~" not in shown and quoted + "> - ~~~\n" in shown
    assert shown[-1] == webui.escape_markup(answer)


@pytest.mark.parametrize("answer, shown", [
    ("Use:\n```py", "Use:\n"), ("Use:\n````", "Use:\n"), ("Use:\n> 1. ~~~ `x`", "Use:\n"),
    ("Use:\n```x``` is inline code", "Use:\n```x``` is inline code"), ("Use:\n``` `", "Use:\n``` `"),
])
def test_only_a_line_that_starts_a_fence_is_held_back(answer, shown):
    """A backtick fence's info string has no backtick (CommonMark and the chat's renderer): a line that starts with
    a code span of three backticks is a paragraph, shown as it streams, not held back to its end."""
    assert webui.while_streaming(answer) == shown


@contextmanager
def scripted_chat(answer: str, model_type: str = "auto", model: ScriptedModel | None = None):
    """The chat UI in this process over a scripted chat model (`model`, or one that answers `answer`); yields its
    URL and the UI."""
    demo = build_ui(ChatRunner(model or ScriptedModel(answer), model_type), "scripted", 1000)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()


def copied(page, role: str) -> str:
    """What the copy button of the last `role` message puts on the clipboard."""
    page.evaluate("navigator.clipboard.writeText('')")
    page.locator(f'#chatbot .{role}-row + .message-buttons button[title="Copy message"]').last.click()
    page.wait_for_function("navigator.clipboard.readText().then(text => text !== '')")
    return page.evaluate("navigator.clipboard.readText()")


def chat_page(browser, url: str, message: str):
    """A page of the chat at `url` that may use the clipboard, with `message` sent and answered."""
    page = browser.new_context(permissions=["clipboard-read", "clipboard-write"]).new_page()
    page.goto(url)
    send(page, message)
    wait_for_state(page, "Done")
    page.wait_for_function("document.querySelector('[data-testid=\"bot\"] pre')")
    return page


# HTML the chat shows as written, copied as written: tags, in a paragraph's lazy continuation lines too, tags the
# chat's Markdown renderer writes itself, a comment and an entity.
HTML_ANSWER = ("Use <b>bold</b>, <script>alert(1)</script> and Vec<String> in `<i>`:\n"
               "    <u>lazy</u> <em>continuation</em>\n\n"
               "```html\n<div>code</div>\n```\n\n"
               "<p>a &amp; b</p> <!-- c -->")


def test_html_shows_and_copies_as_written(browser):
    """In the browser: a chat model's HTML, the user's too, shows as written, and the copy button copies the
    message as written, though the Markdown shown escapes the tags the chat's renderer writes itself (here <em>
    and <p>), the comment and the entity."""
    with scripted_chat(HTML_ANSWER) as (url, _):
        page = chat_page(browser, url, "Is <b>this</b> <p>bold</p>?")
        bot, user = page.locator('[data-testid="bot"]'), page.locator('[data-testid="user"]')
        assert user.inner_text() == "Is <b>this</b> <p>bold</p>?" and user.locator("b").count() == 0
        assert bot.inner_text().startswith("Use <b>bold</b>, <script>alert(1)</script> and Vec<String> in <i>:\n"
                                           "<u>lazy</u> <em>continuation</em>\n")
        assert bot.inner_text().endswith("<p>a &amp; b</p> <!-- c -->")
        assert bot.locator("pre code").inner_text() == "<div>code</div>\n"
        assert bot.locator("b, u, em, script").count() == 0  # nothing rendered as HTML
        assert copied(page, "user") == "Is <b>this</b> <p>bold</p>?"
        assert copied(page, "bot") == HTML_ANSWER


def test_a_code_models_messages_copy_without_their_fences(browser):
    """In the browser: a plain code model's turns show as code blocks, and copy as the text written, as the
    chats of other tools copy a message, not as the Markdown shown with its fences."""
    answer = "    return n\n\n```x```"
    with scripted_chat(answer, "plain") as (url, _):
        page = chat_page(browser, url, "def f(n):")
        assert [code.text_content() for code in page.locator('[data-testid="bot"] pre code').all()] == [answer + "\n"]
        assert copied(page, "user") == "def f(n):"
        assert copied(page, "bot") == answer


def test_the_chat_keeps_a_messages_indentation():
    """Called directly (no browser): the chat strips the indentation of a message given as a string (an indented
    code block would show as a paragraph, with the HTML in it rendered); given as a text part, it keeps it."""
    ui = build_ui(ChatRunner(ScriptedModel()), "scripted", 8)
    actions = {f.fn.__name__: f.fn for f in ui.fns.values() if f.fn}
    chatbot = next(b for b in ui.blocks.values() if getattr(b, "elem_id", None) == "chatbot")
    text = "    x = '<b>'\n    y = 2"
    shown = chatbot.postprocess(actions["add_message"](text, [], "", None)[1]["value"]).model_dump()
    assert shown[0]["content"] == [{"type": "text", "text": text}]


class FailingModel(ScriptedModel):
    """Fails at its third step once `fail` is set (a GPU running out of memory)."""

    fail = False

    def generate_steps(self, *args, **kwargs):
        for n, step in enumerate(super().generate_steps(*args, **kwargs)):
            if n == 2 and self.fail:
                raise RuntimeError("CUDA out of memory")
            yield step


def test_an_error_mid_answer_brings_back_the_last_answers_figures(monkeypatch):
    """Called directly (no browser): the failed answer's first steps replaced the speed figures and the draft
    panel; with its conversation back, the last answer's come back too, and the model is free again."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", 0)
    model = FailingModel()
    runner = ChatRunner(model)
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, (history, _, _, _, figures, drafts, *_) = actions["respond"](pending, [], True, 0, 1, 100)
    model.fail = True
    pending, *_ = actions["add_message"]("again", history, DONE, None)
    updates = actions["respond"](pending, history, True, 0, 1, 100, figures, drafts)
    *streamed, restored = [next(updates) for _ in range(3)]
    assert streamed[-1][4] != figures and streamed[-1][5] != drafts  # the failed answer's, as it streamed
    assert (restored[0], on_chat(restored[3]), *restored[4:6]) == (history, history, figures, drafts)
    assert restored[7] == "again"
    with pytest.raises(gr.Error, match="CUDA out of memory"):
        next(updates)
    assert not runner.busy


@pytest.mark.parametrize("speculative", [True, False])
def test_the_figures_count_the_tokens_up_to_the_formats_end_of_turn(speculative):
    """Called directly (no browser): the answer ends at Qwen's <|im_end|> written as text, the 14th token; a
    speculative step brings tokens past it, which the figures leave out, as the API's usage does, so both modes
    say 14 tokens."""
    runner = ChatRunner(ScriptedModel(" yes<|im_end|>\n<|im_start|>user\nmore"), "qwen")
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("can you?", [], "", None)
    *_, last = actions["respond"](pending, [], speculative, 0, 1, 100)
    tokens, iterations = map(int, SPEED.search(last[4].replace("**", "")).groups())
    assert (tokens, iterations) == (len(" yes<|im_end|>"), 4 if speculative else 14)


class UnfinishedModel(ScriptedModel):
    """Its steps end without a finished one: the step that would say why is left out."""

    def generate_steps(self, *args, **kwargs):
        for step in super().generate_steps(*args, **kwargs):
            if not step.finished:
                yield step


@pytest.mark.parametrize("model", [ScriptedModel(""), UnfinishedModel("abcdefgh")], ids=["no-step", "unfinished"])
@pytest.mark.parametrize("interval", [0, 1e9], ids=["every-step", "first-and-last"])
def test_an_answer_whose_steps_end_unfinished_still_ends(monkeypatch, model, interval):
    """Called directly (no browser): updates that end with no step at all, or none finished, still end the answer:
    the page said Generating… for good, and with the question still pending the next Send was refused."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", interval)
    runner = ChatRunner(model)
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = [None, *actions["respond"](pending, [], True, 0, 1, 100)]
    assert last is not None, "the answer yielded no update"
    written = model.answer[:4]  # the unfinished model's first step
    assert (last[0][-1], last[1], on_chat(last[3])[-1]["content"], last[6]) == (
        {"role": "assistant", "content": written}, None, written, DONE)
    assert last[2] == (DONE, last[4], last[5]) and not runner.busy
    assert actions["add_message"]("next", last[0], last[6], last[1])[0].typed == "next"  # not refused


def test_regenerate_answers_a_question_left_without_its_answer():
    """Called directly (no browser): after an answer that failed, the conversation ends with its question, which
    Regenerate asks again; after an answer, Regenerate asks that answer's question."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    asked = [{"role": "user", "content": "hi"}]
    for history, state in ((asked, "Generation failed"), (asked + [{"role": "assistant", "content": "abc"}], DONE)):
        question = actions["drop_answer"](history, state, None)[0]
        assert (question.asked, question.typed) == (asked, None)


def test_a_message_of_only_spaces_is_not_sent():
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    with pytest.raises(gr.Error, match="The message is empty"):
        actions["add_message"](" \n ", [], "", None)


def test_stop_before_the_answer_began_gives_the_question_back_unless_a_new_one_is_typed():
    """Called directly (no browser): the question goes back into the message box, but not over text typed since."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    def pending():
        return webui.Question([{"role": "user", "content": "hi"}], "hi")

    assert actions["stopped"](GENERATING, [], pending(), ("", "", ""), "")[2] == "hi"
    assert actions["stopped"](GENERATING, [], pending(), ("", "", ""), "next question")[2] == gr.skip()


def test_text_held_back_at_the_end_of_the_answer_is_shown(monkeypatch):
    """Called directly (no browser): "<" may start Qwen's <|im_end|> written as text; held back, it is shown once the
    answer ends without it, in the chat and the draft panel."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", 0)
    runner = ChatRunner(ScriptedModel("ab<"), "qwen")
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], False, 0, 1, 100)
    assert last[0][-1]["content"] == "ab<" and "&lt;" in last[5]


def test_the_draft_panel_shows_html_as_text():
    """Called directly (no browser): the panel is HTML, so the answer's own is escaped there."""
    runner = ChatRunner(ScriptedModel("a<b>c"))
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending, *_ = actions["add_message"]("hi", [], "", None)
    *_, last = actions["respond"](pending, [], True, 0, 1, 100)
    assert "a&lt;b" in last[5] and "&gt;c" in last[5] and "<b>" not in last[5]


def test_a_code_block_fence_is_longer_than_every_run_of_backticks_in_the_code():
    assert webui.code_block("a ``` b ```` c") == "`````\na ``` b ```` c\n`````"


def test_a_model_without_a_chat_template_has_its_turns_shown_as_code():
    """Called directly (no browser): `auto` with no template is plain text, a base/code model's."""
    model = ScriptedModel()
    model.tokenizer.chat_template = None
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(model), "scripted", 8).fns.values() if f.fn}
    shown = on_chat(actions["add_message"]("def f():", [], "", None)[1])
    assert shown == [{"role": "user", "content": "```\ndef f():\n```"}]


def test_an_answer_sent_for_an_earlier_question_leaves_the_one_asked_since_to_its_own_answer():
    """Called directly (no browser): an answer the page could not cancel (Stop before the page knew its event) ran
    once the model was free and, reading the session's question when it ran, answered the one asked since and
    marked it answered; that question's own answer then did nothing, and the page (which follows only the
    latter) said Done with no answer shown (CI, test_queued_user_waits_and_stop_frees_the_model)."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    first_key = actions["add_message"]("hi", [], "", None)[3]
    pending, _, _, key, *_ = actions["add_message"]("hi again", [], STOPPED, None)  # after Stop
    assert key != first_key and key == pending.key
    assert list(actions["respond"](pending, [], True, 0, 1, 8, "", "", first_key)) == []
    *_, last = actions["respond"](pending, [], True, 0, 1, 8, "", "", key)
    assert last[0][0] == {"role": "user", "content": "hi again"} and last[0][-1]["role"] == "assistant"
    assert last[1] is None  # answered


def test_a_question_asked_before_a_stop_the_server_took_first_is_not_answered():
    """Called directly (no browser): on a server under load, a Send (or Regenerate) processed after a Stop (or Clear)
    pressed after it was answered, the Stop having found no question to stop. The page counts the presses as they
    come and a question keeps the count it was asked with: one asked before a press the session has taken is taken
    back, as Stop takes back a question whose answer has not begun (its text back in the box); one asked after is
    answered."""
    model = ScriptedModel()
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(model), "scripted", 8).fns.values() if f.fn}
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}]
    seen = webui.StopPresses()
    actions["stopped"](DONE, history, None, ("", "", ""), "again", 1, seen)  # the page's first press, taken first
    pending = actions["add_message"]("again", history, DONE, None, 0)[0]  # asked before it
    (back,) = actions["respond"](pending, history, True, 0, 1, 8, "", "", pending.key, seen)
    assert (back[0], back[1], on_chat(back[3]), back[6], back[7]) == (history, None, history, STOPPED, "again")
    pending = actions["drop_answer"](history, DONE, None, 0)[0]
    assert [u[6] for u in actions["respond"](pending, history, True, 0, 1, 8, "", "", pending.key, seen)] == [STOPPED]
    actions["cleared"](None, 2, seen)
    pending = actions["add_message"]("again", [], "", None, 1)[0]
    assert [u[1] for u in actions["respond"](pending, [], True, 0, 1, 8, "", "", pending.key, seen)] == [None]
    assert model.calls == []
    pending = actions["add_message"]("again", [], "", None, 2)[0]  # asked after both presses
    *_, last = actions["respond"](pending, [], True, 0, 1, 8, "", "", pending.key, seen)
    assert last[0][-1] == {"role": "assistant", "content": "abcdefgh"} and len(model.calls) == 1


def test_a_question_asked_before_a_clear_the_server_took_first_leaves_the_page_as_clear_left_it():
    """Called directly (no browser): taken back after a Clear (not a Stop), the question leaves the chat empty, the
    notice line empty as Clear's, not "Stopped.", and its text not given back (Clear drops a question's text)."""
    actions = {f.fn.__name__: f.fn for f in build_ui(ChatRunner(ScriptedModel()), "scripted", 8).fns.values() if f.fn}
    seen = webui.StopPresses()
    actions["cleared"](None, 1, seen)  # the page's first press, taken first
    pending = actions["add_message"]("again", [], DONE, None, 0)[0]  # asked before it
    (back,) = actions["respond"](pending, [], True, 0, 1, 8, "", "", pending.key, seen)
    assert (back[0], back[1], on_chat(back[3]), back[6], back[7]) == ([], None, [], "", "")
    actions["stopped"]("", [], None, ("", "", ""), "", 2, seen)  # a Stop after the Clear: the Stop's way
    pending = actions["add_message"]("again", [], DONE, None, 0)[0]
    (back,) = actions["respond"](pending, [], True, 0, 1, 8, "", "", pending.key, seen)
    assert (back[6], back[7]) == (STOPPED, "again")


def test_each_message_has_its_own_copy_button():
    """Called directly (no browser): the chat would show two messages of one role in a row in one bubble, whose copy
    button copies them joined with a newline, a text the page's #copy-texts does not hold (the copy then gave the
    Markdown shown, escaped); each message in its own bubble copies as written."""
    ui = build_ui(ChatRunner(ScriptedModel()), "scripted", 8)
    chatbot = next(b for b in ui.blocks.values() if getattr(b, "elem_id", None) == "chatbot")
    assert chatbot.get_config()["group_consecutive_messages"] is False


def test_the_start_lines_name_the_commands_share_option(monkeypatch, capsys):
    """Called directly (no browser): Gradio's start lines tell a Python caller to set `share=True` in `launch()`; this
    command's user reads the URL and --share instead."""
    monkeypatch.setattr(webui, "load_runner", lambda parser, args: ChatRunner(ScriptedModel()))
    monkeypatch.setattr(gr.Blocks, "block_thread", gr.Blocks.close)  # the server closed where it would wait
    port = free_port()
    webui.main(["--host", "127.0.0.1", "--port", str(port)])
    out = capsys.readouterr().out
    assert f"Running on local URL:  http://127.0.0.1:{port}\n" in out
    assert "start with --share" in out and "share=True" not in out


def test_a_stop_taken_as_the_answer_begins_ends_it(monkeypatch):
    """Called directly (no browser): the Stop pressed after Send is taken as the answer begins (the Stop found no
    question): the answer ends at its next step, taken back, and the model is free."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", 0)
    runner = ChatRunner(ScriptedModel())
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    seen = webui.StopPresses()
    pending = actions["add_message"]("hi", [], "", None, 0)[0]
    updates = actions["respond"](pending, [], True, 0, 1, 100, "", "", pending.key, seen)
    assert next(updates)[6] == GENERATING
    actions["stopped"](DONE, [], None, ("", "", ""), "", 1, seen)
    (back,) = list(updates)
    assert (back[0], back[1], back[6], back[7]) == ([], None, STOPPED, "hi") and not runner.busy


class StopBetweenTheChecks:
    """The session's Stop presses (as `webui.StopPresses`), where the server takes a Stop (`stop`) while the answer
    checks its question: after it read `stopped`, before it reads the count of presses. `stopped_when_counted`:
    whether `question` was already stopped as each press was counted (an answer in another thread reads the
    count first, then `stopped`)."""

    def __init__(self, question):
        self.count, self.stop, self.question, self.stopped_when_counted = 0, None, question, []
        self.cleared = False

    def take(self, presses: float, cleared: bool) -> None:
        self.cleared = cleared
        self.seen = int(presses)

    @property
    def seen(self) -> int:
        stop, self.stop = self.stop, None
        if stop is not None:
            stop()
        return self.count

    @seen.setter
    def seen(self, count: int) -> None:
        self.stopped_when_counted.append(self.question.stopped)
        self.count = count


def test_a_stop_that_found_the_answer_keeps_it_even_taken_between_the_answers_checks(monkeypatch):
    """Called directly (no browser): a Stop that finds the question mid-answer counts its press too. Taken just
    after the answer saw its question not stopped, the count alone made it look like a Stop that found no question:
    the question and its answer so far were taken back (the conversation without them, the text in the box)."""
    monkeypatch.setattr(webui, "UPDATE_INTERVAL", 0)
    runner = ChatRunner(ScriptedModel())
    actions = {f.fn.__name__: f.fn for f in build_ui(runner, "scripted", 100).fns.values() if f.fn}
    pending = actions["add_message"]("hi", [], "", None, 0)[0]
    presses = StopBetweenTheChecks(pending)
    updates = actions["respond"](pending, [], True, 0, 1, 100, "", "", pending.key, presses)
    so_far = next(updates)[0]
    presses.stop = lambda: actions["stopped"](GENERATING, so_far, pending, ("", "", ""), "", 1, presses)
    rest = list(updates)
    assert presses.stop is None and presses.stopped_when_counted == [True] and not runner.busy
    assert [update[0][:1] for update in rest] == [[{"role": "user", "content": "hi"}]] * len(rest)
    assert STOPPED not in [update[6] for update in rest]


def send_taken_after_the_stop(demo) -> None:
    """Make the server take a Send only once it has taken the Stop pressed after it, as one under load may."""
    actions = {f.fn.__name__: f for f in demo.fns.values() if f.fn}
    stop_taken = threading.Event()
    ask, take_stop = actions["add_message"].fn, actions["stopped"].fn

    @functools.wraps(ask)
    def ask_after_the_stop(*args):
        assert stop_taken.wait(60), "the Stop was not taken"
        return ask(*args)

    @functools.wraps(take_stop)
    def take_the_stop(*args):
        try:
            return take_stop(*args)
        finally:
            stop_taken.set()

    actions["add_message"].fn, actions["stopped"].fn = ask_after_the_stop, take_the_stop


def test_a_send_the_server_takes_after_a_stop_pressed_after_it_is_taken_back(browser):
    """In the browser: a server under load takes the Stop pressed just after Send before the Send (here the Send
    waits for it): the Stop finds no question, and the question is taken back once its answer would begin, its
    text back in the box, not answered."""
    model = ScriptedModel()
    with scripted_chat("", model=model) as (url, demo):
        send_taken_after_the_stop(demo)
        page = browser.new_page()
        page.goto(url)
        send(page, "hello")
        press(page, "#stop")
        wait_for_state(page, "Stopped", timeout=60)  # (the Stop, finding no question, left the line as it was)
        page.wait_for_function("document.querySelector('#message textarea').value === 'hello' && "
                               "document.querySelectorAll('[data-testid=\"user\"]').length === 0")
        assert model.calls == []


def test_a_question_taken_back_leaves_text_typed_since_in_the_box(browser):
    """In the browser: the Stop pressed just after Send is taken first; the Send is then taken (the box emptied) but
    its answer waits for the model (another user's answer), and the user types the next question meanwhile. The
    question taken back as its answer would begin leaves the box as typed, as Stop's own path does, instead of
    putting its own text over it."""
    model = ScriptedModel()
    with scripted_chat("", model=model) as (url, demo):
        typed = threading.Event()
        send_taken_after_the_stop(demo)
        for answer in (f for f in demo.fns.values() if f.fn and f.fn.__name__ == "respond"):
            respond = answer.fn

            @functools.wraps(respond)
            def respond_once_typed(*args, respond=respond):
                assert typed.wait(60), "the next question was not typed"
                yield from respond(*args)

            answer.fn = respond_once_typed
        page = browser.new_page()
        page.goto(url)
        send(page, "hello")
        press(page, "#stop")
        wait_for_state(page, "Generating", timeout=60)  # the Send taken after the Stop
        page.wait_for_function("document.querySelector('#message textarea').value === ''")
        page.locator("#message textarea").fill("next question")
        typed.set()
        wait_for_state(page, "Stopped", timeout=60)  # the question taken back
        # and the page's own step once the answer is done (it empties the hidden text given back)
        page.wait_for_function("(document.querySelector('#given-back textarea') || {value: ''}).value === ''")
        assert page.locator("#message textarea").input_value() == "next question"
        assert page.locator('[data-testid="user"]').count() == 0 and model.calls == []


def test_without_the_clipboard_api_a_message_copies_as_written(browser):
    """In the browser, as a page served over http from another host sees it (no clipboard API): the chat copies a
    textarea holding the Markdown shown, and the copy takes the text as written."""
    with scripted_chat(HTML_ANSWER) as (url, _):
        context = browser.new_context()
        context.add_init_script("delete Navigator.prototype.clipboard")
        page = context.new_page()
        page.goto(url)
        send(page, "hi")
        wait_for_state(page, "Done")
        page.evaluate("""() => document.addEventListener('copy', (event) => {
            window.copied = event.clipboardData.getData('text/plain');  // as the page's copy left it
        })""")
        page.locator('#chatbot .bot-row + .message-buttons button[title="Copy message"]').last.click()
        page.wait_for_function("window.copied !== undefined")
        assert page.evaluate("window.copied") == HTML_ANSWER


def test_text_typed_while_the_server_takes_the_send_stays_in_the_box(browser):
    """In the browser: a server under load takes a Send a while after it was pressed (here the Send waits until the
    next question is typed). The box empties as Send is pressed, and text typed before the server takes the Send
    stays in it; the question sent is answered."""
    with scripted_chat("abc") as (url, demo):
        typed = threading.Event()
        asks = [f for f in demo.fns.values() if f.fn and f.fn.__name__ == "add_message"]
        for ask in asks:
            @functools.wraps(ask.fn)
            def ask_once_typed(*args, ask=ask.fn):
                assert typed.wait(60), "the next question was not typed"
                return ask(*args)

            ask.fn = ask_once_typed
        page = browser.new_page()
        page.goto(url)
        send(page, "hello")
        page.wait_for_function("document.querySelector('#message textarea').value === ''")
        page.locator("#message textarea").fill("next question")
        typed.set()
        wait_for_state(page, "Done", timeout=60)
        page.wait_for_function("document.querySelectorAll('[data-testid=\"user\"]').length === 1")
        assert page.locator('[data-testid="user"]').inner_text() == "hello"
        assert page.locator("#message textarea").input_value() == "next question"
