"""Stop strings (`SamplingParams.stop`): a sample ends at the token that completes one of them in its text.

The rule is transformers' `stop_strings` (StopStringCriteria): after each new token, a stop string counts
when the decoded text holds an occurrence that the new token takes part in. The text before the new token
counts too, the prompt's tail included, so an RPO suffix that completes a stop string its kept path began
stops where the whole path would have. vLLM matches the generated text alone, and does not see such an
occurrence. The text is what the trainer's reward functions read: special tokens skipped.

A fast tokenizer's text comes a token at a time from `tokenizers`' DecodeStream (about a microsecond a
token; vLLM's detokenizer uses it too): a sequence keeps its stream and the last len(longest) - 1
characters, and an occurrence must end in the new text (a token that ends a character cut in two gives
none until the character is whole). Any other tokenizer decodes a window of the last tokens twice, without
and with the new one (tens of microseconds a token): an occurrence the new token takes part in ends past
the two texts' common prefix and starts at most len(string) - 1 characters before it; a character is at
most 4 tokens of a byte-level vocabulary (its UTF-8 bytes), so a window of 4 * len(string) tokens before
the new one holds it, and a few more keep it clear of what decoding does at a window's start (a
character cut in two, a dropped leading space). A stream starts from the same window.
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
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if streaming else None
        if self.backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers before 0.21
                self.backend = None
            else:
                self.new_stream = lambda: DecodeStream(skip_special_tokens=True)

    def completed_by_last(self, token_ids: list[int], state: list | None) -> tuple[bool, list | None]:
        """Whether the last of `token_ids` completes an occurrence of one of the strings; and the state to pass
        with the sequence's next token (None at its first generated token)."""
        if self.backend is None:
            window = token_ids[-(self.window + 1):]
            before, after = self.decode(window[:-1]), self.decode(window)
            new_from = len(os.path.commonprefix([before, after]))  # the text that changed: the new token's
            return self.occurs(after, new_from), None
        if state is None:  # the sequence's first generated token: the text before it, from the last tokens
            # a token at a time: a stream given many at once that end inside a character gives none of their
            # text until that character is whole, and would then give it all as the new token's
            stream = self.new_stream()
            state = [stream, "".join(stream.step(self.backend, t) or "" for t in token_ids[-(self.window + 1):-1])]
        stream, tail = state
        new = stream.step(self.backend, token_ids[-1])
        if not new:  # part of a character (or a skipped special token): no new text yet
            return False, state
        text = tail + new
        state[1] = text[len(text) - self.longest + 1:] if self.longest > 1 else ""
        return self.occurs(text, len(tail)), state

    def occurs(self, text: str, new_from: int) -> bool:
        """Whether one of the strings occurs in `text` ending at or past `new_from` (in its new part)."""
        return any(text.find(s, max(0, new_from - len(s) + 1)) != -1 for s in self.strings)
