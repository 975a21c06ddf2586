"""Gradio chat UI over one speculative-decoding model.

    python -m application.webui [--base-model-path ... --ea-model-path ...] [--port 7860]

Answers stream as they are verified, with live tokens/s and the mean
accepted length; a switch compares speculative with plain decoding, and the
last answer can be shown split into text from accepted draft tokens and text
the target produced itself. All users share the one model: generation runs
through Gradio's queue one request at a time, and waiting users see so.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field

import gradio as gr
from markdown_it import MarkdownIt

from eagle_gto import GenerationStats

from .chat_runner import ChatRunner, ChatTemplateError, ContextLengthError, GenerationOptions, InvalidTextError
from .server_options import build_parser, check_address, load_runner, model_name
from .text_stream import StopStrings, until_stop

log = logging.getLogger("eagle_gto.webui")

CODE_EXAMPLES = ["def fibonacci(n):", "import os\n\n\ndef list_python_files(folder):",
                 "class Stack:\n    def __init__(self):"]
CHAT_EXAMPLES = ["Write a Python function that checks whether a number is prime.",
                 "Explain speculative decoding in three sentences."]
DRAFT_STYLE = "background:#bbf7d0;border-radius:3px"  # green: text from accepted draft tokens
WAITING = "Waiting for the model: another answer is being generated…"
GENERATING, STOPPED = "Generating…", "Stopped."
DONE = "Done: the model ended its answer."
ANSWER_LIMIT = "Done: the answer reached its limit of {} (Max new tokens)."
CONTEXT_FULL = "Done: the context is full ({} tokens for prompt and answer; see --max-length)."
# The browser redraws the whole answer and draft panel on each update: more than about 20 a second only
# loads the page (a fast model verifies 100 iterations a second) and delays clicks such as Stop.
UPDATE_INTERVAL = 0.05  # seconds between two updates of a streaming answer
# the user's to fix: said without a traceback in the log
ERROR_TITLES = {ContextLengthError: "Prompt too long", ChatTemplateError: "Chat template error",
                InvalidTextError: "Invalid text"}


def counted(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def answer_limit(max_new_tokens: int) -> str:
    return ANSWER_LIMIT.format(counted(max_new_tokens, "new token"))


def code_block(text: str) -> str:
    """Markdown that shows `text` verbatim: a fence longer than any run of backticks in it."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text}\n{fence}"


# The chat renders Markdown with HTML in it. Its `allow_tags` shows the tags it lists as written; `tags_as_text`
# lists those the conversation uses. It cannot list the tags its own Markdown renderer writes (its code blocks
# would show their markup too): those, comments, declarations and entities are escaped in the Markdown instead,
# outside code, where they show verbatim anyway (the copy button still copies the text as written:
# COPY_AS_WRITTEN).
RENDERER_TAGS = frozenset("a blockquote br button code del div em h1 h2 h3 h4 h5 h6 hr img input li ol p path pre "
                          "span strong svg table tbody td th thead tr ul".split())
TAG = re.compile(r"</?([A-Za-z][^\s/<>]*)")  # a tag's start and its name, as allow_tags reads them
# A tag's start, the start of a comment, declaration or processing instruction, or an entity
HTML_START = re.compile(TAG.pattern + r"|<(?=[!?])|&(?=#?\w+;)")
MARKUP = re.compile(r"((?<!`)(`+)(?!`).+?(?<!`)\2(?!`))|" + HTML_START.pattern, re.DOTALL)  # or a code span (kept)
ENTITIES = {"&": "&amp;", "<": "&lt;"}
# CommonMark's blocks, as the chat's renderer (marked) finds them; the text within them is not needed
BLOCKS = MarkdownIt("commonmark").disable(["inline", "text_join"])
LEAF_BLOCKS = ("paragraph_open", "heading_open", "fence", "code_block", "html_block")  # (a line is in one)
LINE = re.compile(r"[^\n]*\n|[^\n]+")  # as the chat counts lines (str.splitlines has more line breaks)


# The start of a code fence, after the line's block quote and list item markers. The chat's renderer (marked)
# reads a fence that follows a paragraph line only once the fence's line has ended; the escaper (CommonMark) at
# once, so a streaming answer's unfinished last line that starts a fence waits for its line break
# (`while_streaming`). A backtick fence's info string has no backtick (in both): "```x``` is code" is a paragraph.
FENCE_START = re.compile(r"(?:[ \t>]|[-+*][ \t]|\d{1,9}[.)][ \t])*(?:`{3,}[^`]*$|~~~)")


def while_streaming(answer: str) -> str:
    """A streaming answer as the chat shows it: without an unfinished last line that starts a code fence."""
    before, newline, last = answer.rpartition("\n")
    return before + newline if FENCE_START.match(last) else answer


# The chat's copy button copies a message's Markdown as shown (HTML escaped, a code model's fences): this script,
# run in the page, gives the clipboard the text as written instead, looked up by the Markdown shown in the
# hidden #copy-texts (`copy_texts`). Without the clipboard API (a page served over plain http from another host
# than localhost: not a secure context) the chat copies a textarea holding the Markdown shown: its copy event gets
# the text as written.
COPY_AS_WRITTEN = """() => {
    const written = (shown) => {
        const pairs = JSON.parse(document.querySelector('#copy-texts textarea')?.value || '[]');
        const pair = pairs.find((pair) => pair[0] === shown);
        return pair ? pair[1] : shown;
    };
    if (navigator.clipboard) {
        const write = navigator.clipboard.writeText.bind(navigator.clipboard);
        navigator.clipboard.writeText = (text) => write(written(text));
    }
    document.addEventListener('copy', (event) => {
        const box = event.target;  // the chat's, put first in the page's body for the copy
        if (box instanceof HTMLTextAreaElement && box.parentElement === document.body) {
            event.clipboardData.setData('text/plain', written(box.value));
            event.preventDefault();
        }
    });
}"""


# A Send or Regenerate that a server under load processes after a Stop or Clear pressed after it would be answered:
# the page cancels only the events it knows of, and the Stop found no question to stop. So the page counts Stop
# and Clear presses at once (this script, run in the page), a question keeps the count the page had when it was
# asked, and the session the count its Stops and Clears have brought (`StopPresses`): a question asked with fewer
# was asked before one of them, and is not answered.
COUNT_PRESS = "(presses) => presses + 1"

# The text of a question an answer gives back (Stop took it back, or the answer failed) goes back into the message
# box only if the box is still empty: the answer may come long after Send on a loaded server, and the user may have
# typed the next question since. The answer leaves the text in the hidden #given-back; this script, run in the page
# once the answer has ended, reads the box as it is then (a Python function would see it as it was at Send).
GIVE_BACK = "(given, typed) => [typed || given, '']"

# Send takes the typed text out of the message box in the page, as it is pressed, into the hidden box Send's
# question is read from: emptied by the server once it took the Send, the box lost what the user had typed since
# on a loaded server. A Send refused gives its text back as an answer does (GIVE_BACK).
TAKE_TYPED = "(typed) => ['', typed]"


def tags_as_text(history: list[dict]) -> list[str]:
    """The names of the tags written in the conversation that the chat can show as written."""
    names = {name.lower() for m in history for name in TAG.findall(m["content"])}
    return sorted(names - RENDERER_TAGS)


def escaped_start(start: str, tag: str | None) -> str:
    """The start of HTML (`HTML_START`'s match; `tag`: its tag's name) as the chat must read it: escaped, but for
    the tags `allow_tags` shows as written."""
    return start if tag and tag.lower() not in RENDERER_TAGS else ENTITIES[start[0]] + start[1:]


@functools.lru_cache(maxsize=256)  # each update shows the whole conversation: only its last answer is new
def escape_markup(text: str) -> str:
    """Markdown in which HTML written in `text` (a model's `<p>` or `<!-- -->`, a user's `&amp;`) shows as
    written, with the chat's `allow_tags` from `tags_as_text`: the chat renders HTML in Markdown, and its
    sanitizer drops what it does not allow."""
    def escaped(match: re.Match) -> str:  # MARKUP's match
        return match.group(0) if match.group(1) else escaped_start(match.group(0), match.group(3))

    starts = HTML_START.sub(lambda match: escaped_start(match.group(0), match.group(1)), text)
    if starts == text:
        return text  # nothing to escape, in code or not: no need to parse the Markdown
    lines, lines_escaped = LINE.findall(text), LINE.findall(starts)
    block: list[int | None] = [None] * len(lines)  # the block each line belongs to (None: a blank line, ...)
    kind = {None: "paragraph_open"}
    # The blocks of the Markdown the chat reads: a `<p>` escaped outside code starts no HTML block there (an
    # HTML block runs to a blank line, over what would have been a fenced code block).
    # (A lone \r, a line break for markdown-it, is none for the chat: its lines would not be these.)
    for number, token in enumerate(BLOCKS.parse(re.sub(r"\r(?!\n)", " ", starts))):
        if token.type in LEAF_BLOCKS:
            block[token.map[0]:token.map[1]] = [number] * (token.map[1] - token.map[0])
            kind[number] = token.type
    out, start = [], 0
    for end in range(1, len(lines) + 1):  # each block on its own: a code span ends with its block
        if end == len(lines) or block[end] != block[start]:
            if kind[block[start]] in ("fence", "code_block"):  # shown verbatim
                out += lines[start:end]
            elif kind[block[start]] == "html_block":  # raw HTML, without code spans
                out += lines_escaped[start:end]
            else:
                out.append(MARKUP.sub(escaped, "".join(lines[start:end])))
            start = end
    return "".join(out)


def by_origin(text: str, drafted: bool) -> str:
    text = html.escape(text)
    return f'<span style="{DRAFT_STYLE}">{text}</span>' if drafted else text


def origin_box(spans: str) -> str:
    """The answer with text from accepted draft tokens on green, the rest
    (tokens the target produced itself) plain."""
    legend = f'<span style="{DRAFT_STYLE}">accepted draft tokens</span> · plain: tokens the target produced itself'
    return (f'<div style="font-size:0.85em;opacity:0.8">{legend}</div>'
            f'<pre style="white-space:pre-wrap;overflow-wrap:anywhere;margin:4px 0">{spans}</pre>')


def stats_line(stats, speculative: bool) -> str:
    mode = "speculative decoding" if speculative else "plain decoding"
    return (f"**{stats.tokens_per_second:.1f} tokens/s** · mean accepted length "
            f"**{stats.mean_accepted_length:.2f}** tokens/iteration · {counted(stats.new_tokens, 'token')} in "
            f"{counted(stats.iterations, 'iteration')} · {mode}")


@dataclass
class StopPresses:
    """The Stop and Clear presses the session has taken (see COUNT_PRESS); the session keeps the object itself,
    so an answer sees a Stop taken while it runs."""

    seen: int = 0
    cleared: bool = False  # the last press was Clear's: a question it takes back leaves the page as Clear left it

    def take(self, presses: float, cleared: bool) -> None:
        """A press of Stop (or, `cleared`, Clear) that was the page's `presses`th."""
        if int(presses) >= self.seen:  # the latest press says how the page is left
            self.cleared = cleared  # (set before the count an answer in another thread reads first)
            self.seen = int(presses)


@dataclass
class Question:
    """A conversation to answer, from Send (with the typed text) or Regenerate (`typed` None): the session's
    `pending` until its answer ends or Stop or Clear comes. The session keeps the object itself, so the answer
    sees `stopped` as it goes: the page cancels an answer only once it knows the answer's event, and a Stop
    pressed just after Send or Regenerate missed it (the model went on, the page saying Stopped)."""

    asked: list[dict]
    typed: str | None
    stopped: bool = False
    # Its answer's own key. gr.State is read when an event is processed, not when it is sent: an answer the page
    # could not cancel (Stop before it knew the event) would, once the model was free, answer the question asked
    # since, and mark it answered, so that question's own answer did nothing and the page showed none.
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    presses: int = 0  # the Stop and Clear presses the page had counted when it was asked (see COUNT_PRESS)

    def asked_before_a_stop(self, presses: StopPresses | None) -> bool:
        """Asked before a Stop or Clear the session has taken since, which found no question to stop. One that
        found this question marked it `stopped` before counting its press (`take_press`), so `stopped` is read
        after the count: a Stop taken in between is not mistaken for one that found nothing."""
        return presses is not None and self.presses < presses.seen and not self.stopped


def take_press(pending: Question | None, presses: float, seen: StopPresses | None, cleared: bool) -> None:
    """A Stop (or, `cleared`, a Clear) the session takes: the question it found stopped first, then its press
    counted (the order `Question.asked_before_a_stop` relies on, read by an answer running in another thread)."""
    if pending is not None:
        pending.stopped = True
    if seen is not None:
        seen.take(presses, cleared)


def build_ui(runner: ChatRunner, name: str, max_new_tokens: int) -> gr.Blocks:
    # The answer shares the context with the prompt.
    most = min(max_new_tokens, runner.longest_answer)

    @functools.lru_cache(maxsize=1024)  # each streamed update shows, and lists for copying, every message again
    def as_shown(content: str) -> str:
        """A message as the chat shows it: a plain code model's turns are code, shown verbatim."""
        return code_block(content) if runner.plain_text else escape_markup(content)

    def show(history: list[dict]) -> dict:
        # A text part, not a string: the chat would strip a string's indentation (inspect.cleandoc), and with
        # it an indented code block.
        value = [{"role": m["role"], "content": {"type": "text", "text": as_shown(m["content"])}} for m in history]
        return gr.update(value=value, allow_tags=False if runner.plain_text else tags_as_text(history))

    def copy_texts(history: list[dict]) -> str:
        """For `COPY_AS_WRITTEN`: each message shown other than as written, as [shown, written]."""
        pairs = [[as_shown(m["content"]), m["content"]] for m in history]
        return json.dumps([pair for pair in pairs if pair[0] != pair[1]])

    def one_turn_at_a_time(state: str, pending: Question | None) -> None:
        """Send and Regenerate wait for this conversation's answer: the next turn starts from the whole answer.
        The page may still say Generating… once the answer has ended (its last update on its way, or dropped
        as Stop came): the session's `pending`, None once answered or stopped, says so first."""
        if state in (GENERATING, WAITING) and pending is not None:
            raise gr.Error("An answer is still being generated: wait for it to end, or press Stop.",
                           title="Answer in progress", print_exception=False)

    # Send and Regenerate only show the conversation to answer (`asked`) and hand it to `respond`
    # with the typed text (None for Regenerate); the history changes once the answer comes.
    def add_message(message: str, history: list[dict], state: str, pending: Question | None, presses: float = 0):
        one_turn_at_a_time(state, pending)  # the typed text goes back to the box (TAKE_TYPED)
        if not message.strip():
            raise gr.Error("The message is empty: type something first.", title="Empty message",
                           print_exception=False)
        asked = history + [{"role": "user", "content": message}]
        question = Question(asked, message, presses=int(presses))
        return question, show(asked), WAITING if runner.busy else GENERATING, question.key, copy_texts(asked), ""

    def drop_answer(history: list[dict], state: str, pending: Question | None, presses: float = 0):
        one_turn_at_a_time(state, pending)
        asked = history[:-1] if history and history[-1]["role"] == "assistant" else history
        if not asked:
            raise gr.Error("There is no message to answer again.", title="Nothing to regenerate",
                           print_exception=False)
        question = Question(asked, None, presses=int(presses))
        return question, show(asked), WAITING if runner.busy else GENERATING, question.key, copy_texts(asked), ""

    def finished(stats, max_new: int) -> str:
        """Which limit ended it: the answer's own budget, or the context (the prompt counts there too); none
        (the model's end of answer, or steps that ended without saying why): the model ended it."""
        if stats.finish_reason != "length":
            return DONE
        return answer_limit(max_new) if stats.new_tokens >= max_new else CONTEXT_FULL.format(runner.max_length)

    def answer_update(asked: list[dict], answer: str, pieces: str, figures, speculative: bool, state,
                      done: bool) -> tuple:
        """`respond`'s update showing `answer` so far, with its draft `pieces` and `figures`. The last one
        (`done`) answers the question and keeps how it ended: see `stopped`."""
        chat = asked + [{"role": "assistant", "content": answer}]
        streaming = not done and not runner.plain_text  # (a code model's answer is all code)
        shown = asked + [{"role": "assistant", "content": while_streaming(answer)}] if streaming else chat
        figures_line, panel = stats_line(figures, speculative), origin_box(pieces)
        answered = (None, (state, figures_line, panel)) if done else (gr.skip(), gr.skip())
        return chat, *answered, show(shown), figures_line, panel, state, gr.skip(), copy_texts(shown)

    def respond(pending: Question | None, history: list[dict], speculative: bool, temperature: float,
                top_p: float, max_new: int, stats_before: str = "", drafts_before: str = "", key: str | None = None,
                presses: StopPresses | None = None):
        """Answer `pending`, when it is the question this answer was sent for (`key`, sent with the event)."""
        if pending is None or pending.stopped:  # Stop or Clear came before the answer began: nothing to answer
            return
        if key is not None and key != pending.key:  # another question's answer, which the page no longer follows
            return
        asked, typed = pending.asked, pending.typed
        if pending.asked_before_a_stop(presses):
            yield taken_back(history, typed, presses.cleared)
            return
        options = GenerationOptions(min(int(max_new), most), float(temperature), float(top_p), bool(speculative))
        answer, pieces = "", ""
        last_shown = None  # when the browser was last updated; steps in between are shown together
        ended = False  # whether the last update shown was the answer's last
        # The format's end of turn written as text ends the answer there, as in the API and gen_answer.
        stopper = StopStrings(runner.stop_strings)
        try:
            prompt_ids = runner.chat_prompt(asked)
            figures = GenerationStats(len(prompt_ids))  # (no step yet)
            with closing(runner.generate(prompt_ids, options, chat=True)) as updates:
                for update in updates:
                    if pending.stopped:  # (closing the updates frees the model)
                        return
                    if pending.asked_before_a_stop(presses):  # (a Stop taken as the answer began)
                        yield taken_back(history, typed, presses.cleared)
                        return
                    shown = stopper.feed_pieces(update.pieces)
                    done = update.step.finished or stopper.hit
                    # Tokens a step brought past the stop string are not the answer's, as in the API's usage.
                    figures = (until_stop(update.stats, runner.text_stream(prompt_ids, True), stopper.end)
                               if stopper.hit else update.stats)
                    if update.step.finished and not stopper.hit:  # text held back as a stop string's possible start
                        shown += stopper.flush_pieces()
                    answer += "".join(text for text, _ in shown)
                    pieces += "".join(by_origin(text, drafted) for text, drafted in shown)
                    if last_shown is not None and not done and time.monotonic() - last_shown < UPDATE_INTERVAL:
                        continue
                    # The state line changes at the start and at the end only, so that a step still on
                    # its way to the browser when Stop is pressed cannot overwrite "Stopped".
                    state = (DONE if stopper.hit else finished(figures, options.max_new_tokens) if done
                             else GENERATING if last_shown is None else gr.skip())
                    last_shown, ended = time.monotonic(), done
                    yield answer_update(asked, answer, pieces, figures, speculative, state, done)
                    if stopper.hit:  # (closing the updates frees the model)
                        break
            # No step at all, or none finished: the answer ends as it stands (the page would say Generating…
            # for good, its question pending).
            if not ended:
                shown = stopper.flush_pieces()
                answer += "".join(text for text, _ in shown)
                pieces += "".join(by_origin(text, drafted) for text, drafted in shown)
                state = finished(figures, options.max_new_tokens)
                yield answer_update(asked, answer, pieces, figures, speculative, state, True)
        except Exception as err:  # shown to the user, with the conversation and the typed text as they were
            title = ERROR_TITLES.get(type(err))
            if title is None:
                title = "Generation failed"
                log.exception("generation failed")
            # The last answer's stats and draft panel come back with its conversation (the failed answer's
            # first steps may have replaced them).
            notice_line = f'<span style="color:#b91c1c">{html.escape(f"{title}: {err}")}</span>'
            yield (history, None, (notice_line, stats_before, drafts_before), show(history), stats_before,
                   drafts_before, notice_line, typed or "", copy_texts(history))
            raise gr.Error(str(err), title=title, print_exception=False) from err

    def taken_back(history: list[dict], typed: str | None, cleared: bool) -> tuple:
        """`respond`'s update for a question asked before a Stop (or, `cleared`, a Clear) the session took first:
        what that Stop or Clear does to a question it finds before its answer began."""
        if cleared:  # the page as Clear leaves it: the question dropped, its text too
            return history, None, gr.skip(), show(history), gr.skip(), gr.skip(), "", "", copy_texts(history)
        return (history, None, gr.skip(), show(history), gr.skip(), gr.skip(), STOPPED, typed or "",
                copy_texts(history))

    def stopped(state: str, history: list[dict], pending: Question | None, ended: tuple[str, str, str],
                message: str, presses: float = 0, seen: StopPresses | None = None):
        """After Stop: the conversation as it stands; a question stopped before its answer began is not in
        it, so its text goes back into the (empty) message box to send again."""
        take_press(pending, presses, seen, cleared=False)
        if pending is None:
            if state not in (GENERATING, WAITING):  # nothing was running or queued
                return state, show(history), gr.skip(), gr.skip(), gr.skip(), gr.skip(), copy_texts(history)
            # the answer ended before Stop came: its last update may not have reached the page
            end_line, figures_line, panel = ended
            return end_line, show(history), gr.skip(), figures_line, panel, gr.skip(), copy_texts(history)
        answered = len(history) > len(pending.asked) and history[:len(pending.asked)] == pending.asked
        typed_back = pending.typed if pending.typed and not answered and not message else gr.skip()
        return STOPPED, show(history), typed_back, gr.skip(), gr.skip(), None, copy_texts(history)

    def cleared(pending: Question | None, presses: float = 0, seen: StopPresses | None = None):
        take_press(pending, presses, seen, cleared=True)
        return [], None, [], "", "", "", "[]"

    with gr.Blocks(title="eagle-gto chat", analytics_enabled=False) as demo:
        tree = runner.model.tree
        gr.Markdown(f"## eagle-gto: speculative decoding chat\nModel `{name}` · draft tree of "
                    f"{tree.total_token} tokens, depth {tree.depth}, top-k {tree.top_k}")
        history = gr.State([])  # the conversation
        pending = gr.State()  # the Question from Send or Regenerate; None once answered or stopped
        ended = gr.State(("", "", ""))  # how the last answer ended: its notice line, speed figures and draft panel
        # Stop and Clear presses: counted in the page as they come, and as the session has taken them (COUNT_PRESS)
        presses, presses_seen = gr.Number(0, visible=False), gr.State(StopPresses())
        asked_key = gr.Textbox(visible=False)  # the key of the Question an answer is sent for (see Question.key)
        copies = gr.Textbox(visible="hidden", elem_id="copy-texts")  # see COPY_AS_WRITTEN
        given_back = gr.Textbox(visible="hidden", elem_id="given-back")  # see GIVE_BACK
        sent = gr.Textbox(visible=False)  # the text Send took from the message box (see TAKE_TYPED)
        # Each message in its own bubble: two messages of one role in a row would share one, whose copy button
        # copies them joined, a text COPY_AS_WRITTEN does not find. allow_tags: set by `show` with each conversation
        chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chatbot", buttons=["copy"], allow_tags=False,
                             group_consecutive_messages=False)
        notice = gr.Markdown(elem_id="notice")
        stats = gr.Markdown(elem_id="stats")
        with gr.Row():
            message = gr.Textbox(placeholder="Code to continue" if runner.plain_text else "Your message",
                                 show_label=False, lines=2, scale=5, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop = gr.Button("Stop", elem_id="stop")
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
        gr.Examples(CODE_EXAMPLES if runner.plain_text else CHAT_EXAMPLES, inputs=message)
        with gr.Accordion("Decoding", open=True):
            with gr.Row():
                speculative = gr.Checkbox(True, label="Speculative decoding (off: plain decoding)",
                                          elem_id="speculative")
                show_drafts = gr.Checkbox(True, label="Highlight accepted draft tokens")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.01, 1, value=1, step=0.01, label="Top-p (1: off)")
                # A slider's maximum must be above its minimum: for a cap of 1 token it shows 2, respond keeps to 1.
                max_new = gr.Slider(1, max(most, 2), value=min(256, most), step=1, elem_id="max-new-tokens",
                                    label=f"Max new tokens (prompt + answer fit in {runner.max_length} tokens)")
        drafts = gr.HTML(elem_id="drafts")
        # Where the events' progress and error state go instead of their outputs: Gradio shows an error badge
        # over the chatbot (whatever show_progress says) that hides the chat and blocks the message box until
        # dismissed. The notice line and the error toast tell the user instead.
        nowhere = dict(show_progress="hidden", show_progress_on=gr.HTML(visible=False))

        on_page = [chatbot, stats, drafts, notice]
        settings = [speculative, temperature, top_p, max_new]
        generation = dict(fn=respond, inputs=[pending, history, *settings, stats, drafts, asked_key, presses_seen],
                          # the session's states first, together: Stop's cancel may come between two outputs
                          # (each component's is made in a thread), and the states must agree (see `stopped`)
                          outputs=[history, pending, ended, *on_page, given_back, copies],
                          **nowhere,  # the notice says "Waiting…"/"Generating…", not Gradio's queue timers
                          concurrency_limit=1, concurrency_id="model")  # one generation at a time, all users
        turn = dict(fn=add_message, inputs=[sent, history, notice, pending, presses],
                    outputs=[pending, chatbot, notice, asked_key, copies, given_back], **nowhere,
                    concurrency_limit=None)
        events = []
        for ask in (message.submit, send.click):
            asked = ask(None, message, [message, sent], js=TAKE_TYPED).then(**turn)
            asked.failure(None, [sent, message], [message, sent], js=GIVE_BACK)  # refused: the text back
            events.append(asked.success(**generation))
        events.append(regenerate.click(drop_answer, [history, notice, pending, presses],
                                       [pending, chatbot, notice, asked_key, copies, given_back], **nowhere,
                                       concurrency_limit=None)
                      .success(**generation))
        for answered in events:  # (the page runs no `then` after an error: `failure` there)
            for after in (answered.success, answered.failure):
                after(None, [given_back, message], [message, given_back], js=GIVE_BACK)
        # Queued after the cancellation, so it reaches the browser after the stopped answer's last step.
        stop.click(None, presses, presses, js=COUNT_PRESS, cancels=events).then(
            stopped, [notice, history, pending, ended, message, presses, presses_seen],
            [notice, chatbot, message, stats, drafts, pending, copies], **nowhere, concurrency_limit=None)
        # Clear likewise, or a cancelled answer's last step would bring the conversation back; the chatbot's
        # own trash icon does the same, so that the history is not kept behind an empty chat.
        for clearing in (clear.click, chatbot.clear):
            clearing(None, presses, presses, js=COUNT_PRESS, cancels=events).then(
                cleared, [pending, presses, presses_seen], [history, pending, chatbot, stats, drafts, notice, copies],
                **nowhere, concurrency_limit=None)
        demo.load(None, js=COPY_AS_WRITTEN)
        show_drafts.change(lambda on: gr.update(visible=on), show_drafts, drafts, queue=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("python -m application.webui", "Gradio chat UI over an EAGLE speculative-decoding model.",
                          port=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (default: off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_address(parser, args.host, args.port)
    runner = load_runner(parser, args)
    demo = build_ui(runner, model_name(args), args.max_new_tokens)
    # Quiet: Gradio's own lines tell a Python caller to set `share=True` in `launch()`; this command's user has
    # --share. (A share link, or why there is none, Gradio still prints.)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, quiet=True,
                        prevent_thread_lock=True)
    print(f"* Running on local URL:  {demo.local_url.rstrip('/')}", flush=True)  # as Gradio writes it
    if not args.share:
        print("* To create a public link, start with --share.", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
