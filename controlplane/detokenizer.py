"""Incremental detokenizer: turns each step's sampled token ids into the text delta
to stream, and finds stop strings.

Decoding follows vLLM: only a window of ids is decoded each step, from
`prefix_offset` (a few tokens already emitted, for context) to the end; the text
past `read_offset` is new. A window whose text ends in U+FFFD holds an unfinished
multi-byte character, so nothing is emitted until a later token completes it (or
finish() gives up on it). On top of that, text that could be the beginning of a
stop string is held back until it can no longer match. The engine owns one of
these per request, next to the request's Sequence. As in vLLM, the engine passes
check_stop=False until the sequence has more than min_tokens tokens, and a matched
stop string stays in the text with include_stop_str_in_output.

`add_batch` does one step of many detokenizers with one batch decode per
skip_special_tokens setting (two Rust calls instead of two per sequence): the engine's
per-step detokenisation of a few hundred sequences.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the completion, so decoders that treat the first
# token specially (SentencePiece's leading space) see the completion in context.
PROMPT_CONTEXT_TOKENS = 5
# Drop ids before the window once this many pile up, so memory stays bounded too.
TRIM_IDS_AT = 512


@dataclass(slots=True, frozen=True)
class DetokenizerDelta:
    text: str
    stopped: bool = False


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._include_stop = include_stop_str_in_output
        self._stop = tuple(dict.fromkeys(stop))
        self._max_stop_held = max((len(s) for s in self._stop), default=1) - 1
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            # the prompt ends inside a character: the completion must not complete it
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._held_for_stop = ""  # decoded, not yet emitted: a stop string may start in it
        self._finished = False
        self.stopped = False

    def add(self, token_ids: Sequence[int], check_stop: bool = True) -> DetokenizerDelta:
        """The new text of token_ids; with check_stop False, all of it, unsearched for stop strings."""
        windows = self._take(token_ids)
        if windows is None:
            return DetokenizerDelta("", True)
        return self._add_decoded(*(self._decode(w) for w in windows), check_stop)

    def _take(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]] | None:
        """Takes token_ids in; the id windows to decode (the prefix, the whole window), None once stopped."""
        if self._finished:
            raise RuntimeError("add() after finish()")
        if self.stopped:
            return None
        self._ids.extend(token_ids)
        return self._ids[self._prefix_offset:self._read_offset], self._ids[self._prefix_offset:]

    def _add_decoded(self, prefix_text: str, window_text: str, check_stop: bool) -> DetokenizerDelta:
        text = self._held_for_stop + self._new_text(prefix_text, window_text)
        if not check_stop or not self._stop:  # stop strings hold text back only when there are some
            self._held_for_stop = ""
            return DetokenizerDelta(text, False)
        return self._release(text)

    def finish(self) -> str:
        """The text still held back, once the sequence has ended for another reason."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        self._finished = True
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        tail = self._decode(self._ids[self._prefix_offset:])[len(prefix_text):]
        text = self._held_for_stop + tail
        self._held_for_stop = ""
        stop_at = self._find_stop(text)
        if stop_at is not None:
            self.stopped = True
            return text[:stop_at]
        return text

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _new_text(self, prefix_text: str, window_text: str) -> str:
        """The window's text past its prefix, once it ends in a whole character; advances the window."""
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new, or a character is still incomplete: keep the window
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset >= TRIM_IDS_AT:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return window_text[len(prefix_text):]

    def _release(self, text: str) -> DetokenizerDelta:
        stop_at = self._find_stop(text)
        if stop_at is not None:
            self.stopped = True
            self._held_for_stop = ""
            return DetokenizerDelta(text[:stop_at], True)
        held = self._stop_prefix_len(text)
        self._held_for_stop = text[len(text) - held:] if held else ""
        return DetokenizerDelta(text[:len(text) - held], False)

    def _find_stop(self, text: str) -> int | None:
        """Where the output ends: the start of the stop string that is complete first when
        reading text (the longest on a tie), or its end with include_stop_str_in_output;
        so how tokens are grouped into add() calls cannot change which one stops the
        sequence. Text emitted before cannot start one (it would have been held back),
        so searching `text` is enough."""
        matches = [(i + len(s), i) for s in self._stop if (i := text.find(s)) >= 0]
        if not matches:
            return None
        end, start = min(matches)
        return end if self._include_stop else start

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop string."""
        for n in range(min(len(text), self._max_stop_held), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0


def add_batch(tokenizer: Tokenizer, items: list[tuple[IncrementalDetokenizer, Sequence[int], bool]]
              ) -> list[DetokenizerDelta]:
    """IncrementalDetokenizer.add(token_ids, check_stop) of each item, with one batch decode per
    skip_special_tokens setting; the deltas in item order."""
    windows = [detok._take(token_ids) for detok, token_ids, _ in items]
    texts: list[tuple[str, str] | None] = [None] * len(items)
    for skip in (True, False):
        rows = [i for i, (detok, _, _) in enumerate(items)
                if windows[i] is not None and bool(detok._skip_special_tokens) == skip]
        if not rows:
            continue
        decoded = tokenizer.decode_batch([w for i in rows for w in windows[i]], skip_special_tokens=skip)
        for j, i in enumerate(rows):
            texts[i] = decoded[2 * j], decoded[2 * j + 1]
    return [DetokenizerDelta("", True) if text is None else detok._add_decoded(*text, check_stop)
            for (detok, _, check_stop), text in zip(items, texts)]
