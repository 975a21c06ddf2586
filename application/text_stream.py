"""The answer's text as it streams: tokens decoded into text by origin
(accepted draft tokens or the target's own), and stop strings that cut it
(`StopStrings`, `until_stop`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from eagle_gto import GenerationStats, Step
from eagle_gto.chat import decode_after, decode_context


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
