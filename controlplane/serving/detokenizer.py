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

`BatchDetokenizer` does one step of many detokenizers (the engine's per-step
detokenisation of a few hundred sequences) with one batch decode per
skip_special_tokens setting, and most of them with no decode at all: with a byte-level
decoder (GPT-2 style: the text of ids is their bytes, concatenated, read as UTF-8) a
window of one token whose bytes are whole characters, followed by one more token whose
bytes are whole characters too, reads as the two tokens' texts one after the other, so
the new text is that token's text, looked up in a table of every token's text.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import decoders

from controlplane.serving.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the completion, so decoders that treat the first
# token specially (SentencePiece's leading space) see the completion in context.
PROMPT_CONTEXT_TOKENS = 5
# Drop ids before the window once this many pile up, so memory stays bounded too.
TRIM_IDS_AT = 512
BATCH_DECODE_FROM = 32  # windows: fewer are decoded one by one


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
        self._skip_special_tokens = bool(skip_special_tokens)
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
        text = "" if windows is None else self._add_decoded(*(self._decode(w) for w in windows), check_stop)
        return DetokenizerDelta(text, self.stopped)

    def _take(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]] | None:
        """Takes token_ids in; the id windows to decode (the prefix, the whole window), None once stopped."""
        if self._finished:
            raise RuntimeError("add() after finish()")
        if self.stopped:
            return None
        self._ids.extend(token_ids)
        return self._ids[self._prefix_offset:self._read_offset], self._ids[self._prefix_offset:]

    def _add_decoded(self, prefix_text: str, window_text: str, check_stop: bool) -> str:
        """The text to emit, from the decoded windows of _take."""
        return self._add_text(self._new_text(prefix_text, window_text), check_stop)

    def _add_whole_token(self, token_id: int, whole_texts: list[str | None], check_stop: bool) -> str | None:
        """add([token_id]).text without a decode (BatchDetokenizer), when the window is the one token
        read last and both it and token_id have whole-character texts in whole_texts; else None."""
        ids, read = self._ids, self._read_offset
        if read - self._prefix_offset != 1 or len(ids) != read or self._finished or self.stopped:
            return None
        try:
            text = whole_texts[token_id]
            if text is None or whole_texts[ids[-1]] is None:
                return None
        except IndexError:  # past the tokenizer's vocabulary (the model's may be padded)
            return None
        ids.append(token_id)
        self._prefix_offset, self._read_offset = read, read + 1  # _advance(), inlined: the hot path
        if read >= TRIM_IDS_AT:
            self._trim()
        return self._add_text(text, check_stop) if self._stop else text

    def _add_text(self, new_text: str, check_stop: bool) -> str:
        text = self._held_for_stop + new_text
        if not check_stop or not self._stop:  # stop strings hold text back only when there are some
            self._held_for_stop = ""
            return text
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
        self._advance()
        return window_text[len(prefix_text):]

    def _advance(self) -> None:
        """The window's text is out: what was read becomes the next prefix."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset >= TRIM_IDS_AT:
            self._trim()

    def _trim(self) -> None:
        del self._ids[:self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0

    def _release(self, text: str) -> str:
        stop_at = self._find_stop(text)
        if stop_at is not None:
            self.stopped = True
            self._held_for_stop = ""
            return text[:stop_at]
        held = self._stop_prefix_len(text)
        self._held_for_stop = text[len(text) - held:] if held else ""
        return text[:len(text) - held]

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


class BatchDetokenizer:
    """Steps many IncrementalDetokenizers at once: whole-token additions from a table (byte-level
    decoders only), the rest with one batch decode per skip_special_tokens setting."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        backend = getattr(getattr(tokenizer, "hf", None), "backend_tokenizer", None)
        self._byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self._whole_texts: dict[bool, list[str | None]] = {}  # by skip_special_tokens, built on first use
        self.whole_texts(True)  # the default setting: built now rather than in the first step

    def whole_texts(self, skip_special_tokens: bool) -> list[str | None]:
        """Per token id, its text when that is non-empty whole characters (no U+FFFD), else None; empty
        unless the decoder is byte-level. One batch decode of the vocabulary (~50 ms for 50k ids)."""
        texts = self._whole_texts.get(skip_special_tokens)
        if texts is None:
            texts = []
            if self._byte_level:
                decoded = self._tokenizer.decode_batch([[i] for i in range(self._tokenizer.vocab_size)],
                                                       skip_special_tokens=skip_special_tokens)
                texts = [t if t and REPLACEMENT_CHAR not in t else None for t in decoded]
            self._whole_texts[skip_special_tokens] = texts
        return texts

    def add(self, items: list[tuple[IncrementalDetokenizer, int | None, bool]]) -> list[str]:
        """IncrementalDetokenizer.add(token_ids, check_stop).text of each item (detokenizer, token id or
        None for no text, check_stop), in item order; a detokenizer's `stopped` says whether a stop
        string ended it."""
        texts: list[str | None] = [None] * len(items)
        rest = []
        if self._byte_level:
            skipping = self._whole_texts[True]
            for i, (detok, token_id, check_stop) in enumerate(items):
                if token_id is not None:
                    table = skipping if detok._skip_special_tokens else self.whole_texts(False)
                    if (text := detok._add_whole_token(token_id, table, check_stop)) is not None:
                        texts[i] = text
                        continue
                rest.append(i)
        else:
            rest = range(len(items))
        if rest:
            for i, text in zip(rest, self._add_decoding([items[i] for i in rest])):
                texts[i] = text
        return texts

    def _add_decoding(self, items: list[tuple[IncrementalDetokenizer, int | None, bool]]) -> list[str]:
        windows = [detok._take(() if token_id is None else (token_id,)) for detok, token_id, _ in items]
        decoded: list[tuple[str, str] | None] = [None] * len(items)
        for skip in (True, False):
            rows = [i for i, (detok, _, _) in enumerate(items)
                    if windows[i] is not None and detok._skip_special_tokens == skip]
            if rows:
                texts = self._decode([w for i in rows for w in windows[i]], skip)
                for j, i in enumerate(rows):
                    decoded[i] = texts[2 * j], texts[2 * j + 1]
        return ["" if pair is None else detok._add_decoded(*pair, check_stop)
                for (detok, _, check_stop), pair in zip(items, decoded)]

    def _decode(self, windows: list[list[int]], skip_special_tokens: bool) -> list[str]:
        # a batch decode hands the windows to a thread pool: worth it for many, slower for a few
        if len(windows) < BATCH_DECODE_FROM:
            return [self._tokenizer.decode(w, skip_special_tokens=skip_special_tokens) for w in windows]
        return self._tokenizer.decode_batch(windows, skip_special_tokens=skip_special_tokens)
