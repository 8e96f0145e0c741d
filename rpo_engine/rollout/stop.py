"""Stop strings (`SamplingParams.stop`): a sample ends at the token that completes one of them in its text.

The rule is transformers' `stop_strings` (StopStringCriteria): after each new token, a stop string counts
when the decoded text holds an occurrence that the new token takes part in. Which text: the generated text,
as vLLM's (a chat template's closing newline does not meet a "\n\n" with the first token), and before it
the prompt's last `SamplingParams.stop_prompt_tokens` tokens: the trainer counts an RPO kept path, so a
suffix that completes a stop string its kept path began stops where the whole path would have; the whole
prompt gives transformers' rule. The text is what the trainer's reward functions read: special tokens
skipped.

A fast tokenizer's text comes a token at a time from `tokenizers`' DecodeStream (about a microsecond a
token; vLLM's detokenizer uses it too): a sequence keeps its stream and the last len(longest) - 1
characters, and an occurrence must end in the new text. Where the stream holds text back (a token that ends
in a cut character) and the token has a whole character of its own, or where it raises (byte-fallback
bytes whose text is not monotonic: "Invalid prefix"), that token is read by the window, as other
tokenizers' are. Any other tokenizer decodes a window of the last tokens twice, without and with the new
one (tens of microseconds a token): an occurrence the new token takes part in ends past the two texts'
common prefix and starts at most len(string) - 1 characters before it; a character is at most 4 tokens of a
byte-level vocabulary (its UTF-8 bytes), so a window of 4 * len(string) tokens before the new one holds it,
and a few more keep it clear of what decoding does at a window's start (a character cut in two, a dropped
leading space); special tokens, which have no text, are left out of it. A stream starts from the same
window.
"""
from __future__ import annotations

import os


class StopStrings:
    """`strings`, read in the text of `tokenizer` (a Hugging Face tokenizer)."""

    MARGIN = 8  # tokens beyond the longest string's 4 a character, for the window start's decoding

    def __init__(self, strings: list[str], tokenizer, streaming: bool = True):
        """streaming=False: the window decode even for a fast tokenizer (the tests compare the two)."""
        self.strings = list(strings)
        self.longest = max(len(s) for s in self.strings)
        self.window = 4 * self.longest + self.MARGIN
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self.own_text: dict[int, bool] = {}  # has_own_text's answers, by token
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if streaming else None
        if self.backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers before 0.21
                self.backend = None
            else:
                self.new_stream = lambda: DecodeStream(skip_special_tokens=True)

    def completed_by_last(self, token_ids: list[int], state: list | None, start: int = 0) -> tuple[bool, list | None]:
        """Whether the last of `token_ids` completes an occurrence of one of the strings in the text of the tokens
        from `start` on (the generated ones, and the prompt's last ones the request counts); and the state to pass
        with the sequence's next token (None at its first generated token)."""
        if self.backend is None:
            return self.read_window(token_ids, start), None
        if state is None:  # the sequence's first generated token: the text before it, from the last tokens
            # a token at a time: a stream given many at once that end inside a character holds all their text
            # back, and gives it with the next token as if that token's. The tokens before `start` are read for
            # their context (a leading space, a character they begin), their text left out.
            stream, before = self.new_stream(), []
            window, uncounted = self.text_window(token_ids[:-1], start)
            try:
                for i, t in enumerate(window):
                    text = stream.step(self.backend, t)
                    if i >= uncounted:
                        before.append(text or "")
            except Exception:  # "Invalid prefix" (below): the window reads this token, a new stream the next
                return self.read_window(token_ids, start), None
            state = [stream, "".join(before)]
        stream, tail = state
        try:
            new = stream.step(self.backend, token_ids[-1])
        except Exception:  # "Invalid prefix": byte-fallback bytes that decode non-monotonically; start over
            return self.read_window(token_ids, start), None
        if new is None:  # the stream holds text back until a cut character is whole: no new character of its
            # own, unless the token has text before its cut character (a byte-level "Ġ\xc3" ends " "), which the
            # window reads (the stream gives that text later, beside the whole character, past the tail)
            return (self.read_window(token_ids, start) if self.has_own_text(token_ids[-1]) else False), state
        text = tail + new  # `new` may hold what earlier tokens' cut character left back: new text all the same
        state[1] = text[len(text) - self.longest + 1:] if self.longest > 1 else ""
        return self.occurs(text, len(tail)), state

    def has_own_text(self, token: int) -> bool:
        """Whether the token alone decodes to some whole character (not only the pieces of a cut one)."""
        own = self.own_text.get(token)
        if own is None:
            own = self.own_text[token] = bool(self.decode([token]).replace("\ufffd", ""))
        return own

    def read_window(self, token_ids: list[int], start: int = 0) -> bool:
        """The window reading: decode the last tokens without and with the new one."""
        if token_ids[-1] in self.special_ids:  # skipped in the text: it completes nothing
            return False
        window, uncounted = self.text_window(token_ids, start)
        before, after = self.decode(window[:-1]), self.decode(window)
        new_from = len(os.path.commonprefix([before, after]))  # the text that changed: the new token's
        return self.occurs(after, new_from, len(self.decode(window[:uncounted])) if uncounted else 0)

    def text_window(self, token_ids: list[int], start: int = 0) -> tuple[list[int], int]:
        """The last window + 1 tokens, special tokens left out (they have no text, and would narrow it); and how
        many of them come before `start` (read for context, not counted)."""
        window, uncounted = [], 0
        for i in range(len(token_ids) - 1, -1, -1):
            t = token_ids[i]
            if t not in self.special_ids:
                window.append(t)
                uncounted += i < start
                if len(window) > self.window:
                    break
        return window[::-1], uncounted

    def occurs(self, text: str, new_from: int, counted_from: int = 0) -> bool:
        """Whether one of the strings occurs in `text` ending at or past `new_from` (in its new part) and starting
        at or past `counted_from`."""
        return any(text.find(s, max(counted_from, new_from - len(s) + 1)) != -1 for s in self.strings)
