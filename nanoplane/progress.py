"""GenerationProgress: token counters of a batch of requests, shown as a tqdm bar with live tok/s.

The offline LLM's request coroutines count tokens (on its event loop thread); the
caller's thread calls `refresh()` a few times a second, which turns the counts into
prefill and decode rates over the last half second, like Nano-vLLM's bar; when the batch
is done the bar shows the rates over the whole batch. A prompt counts as prefilled when
its first token arrives; every later token counts as decode.
"""
from __future__ import annotations

import time

RATE_WINDOW_S = 0.5


class GenerationProgress:
    def __init__(self, total: int, show: bool):
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.finished = 0
        self._bar = None
        if show:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                raise ImportError("the progress bar needs tqdm: pip install tqdm, or pass use_tqdm=False") from None
            self._bar = tqdm(total=total, desc="Generating", dynamic_ncols=True)
        self._shown_finished = 0
        self._start = time.perf_counter()
        self._last = (self._start, 0, 0)

    def add_prefill(self, num_prompt_tokens: int) -> None:
        self.prefill_tokens += num_prompt_tokens

    def add_decode(self, num_tokens: int) -> None:
        self.decode_tokens += num_tokens

    def finish_one(self) -> None:
        self.finished += 1

    def _show_rates(self, since: float, prefill: int, decode: int, now: float) -> None:
        seconds = max(now - since, 1e-9)
        self._bar.set_postfix({"Prefill": f"{int((self.prefill_tokens - prefill) / seconds)}tok/s",
                               "Decode": f"{int((self.decode_tokens - decode) / seconds)}tok/s"})

    def refresh(self) -> None:
        if self._bar is None:
            return
        now = time.perf_counter()
        then, prefill, decode = self._last
        if now - then >= RATE_WINDOW_S:
            self._show_rates(then, prefill, decode, now)
            self._last = (now, self.prefill_tokens, self.decode_tokens)
        finished = self.finished
        if finished != self._shown_finished:
            self._bar.update(finished - self._shown_finished)
            self._shown_finished = finished

    def close(self) -> None:
        if self._bar is not None:
            self.refresh()
            self._show_rates(self._start, 0, 0, time.perf_counter())
            self._bar.close()
