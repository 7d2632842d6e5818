"""EventLoopThread: an asyncio event loop on a daemon thread, for blocking callers of async code.

The offline LLM drives AsyncClient (and, when it starts its own planes, the control
plane's gRPC server) from this loop, so `LLM.generate` works the same whether or not
the caller already runs an event loop (a script, a notebook, a test).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Awaitable, TypeVar

T = TypeVar("T")


class EventLoopThread:
    def __init__(self, name: str = "nanoplane-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T], timeout_s: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            if hasattr(coro, "close"):
                coro.close()  # never awaited: close it, or Python warns
            raise RuntimeError("EventLoopThread.run called on its own thread would wait for itself forever")
        return self.submit(coro).result(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
