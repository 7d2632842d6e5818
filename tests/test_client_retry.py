"""The client library's retries (client/retry.py): UNAVAILABLE is called again with backoff, within the deadline;
nothing else is; a generation that already streamed tokens only with retry_partial.

End to end: a client started before the server exists connects once it is up (sync and
async), and with retries=0 fails at once with UnavailableError. The mid-generation case
(a data plane killed under a stream) is in tests/test_chaos.py.
"""
import asyncio
import threading
import time

import grpc
import pytest

from client import AsyncClient, Client, SamplingParams, UnavailableError
from client.retry import MAX_BACKOFF_S, RetryPolicy
from tests.stack import InProcessStack, free_port


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


UNAVAILABLE = Failed(grpc.StatusCode.UNAVAILABLE)


def test_only_unavailable_is_retried():
    policy = RetryPolicy(retries=3, backoff_s=0.1)
    assert policy.next_delay_s(UNAVAILABLE, 0, False, None) == 0.1
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL):
        assert policy.next_delay_s(Failed(code), 0, False, None) is None, code


def test_backoff_doubles_up_to_its_cap_and_stops_after_the_retries():
    policy = RetryPolicy(retries=20, backoff_s=0.5)
    delays = [policy.next_delay_s(UNAVAILABLE, attempt, False, None) for attempt in range(21)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0] and max(delays[:20]) == MAX_BACKOFF_S
    assert delays[20] is None


def test_a_generation_that_streamed_tokens_is_retried_only_when_asked():
    assert RetryPolicy(retries=3).next_delay_s(UNAVAILABLE, 0, True, None) is None
    assert RetryPolicy(retries=3, retry_partial=True).next_delay_s(UNAVAILABLE, 0, True, None) is not None
    assert RetryPolicy(retries=3).next_delay_s(UNAVAILABLE, 0, True, None, retry_partial=True) is not None


def test_no_retry_that_would_end_past_the_deadline():
    policy = RetryPolicy(retries=3, backoff_s=1.0)
    assert policy.next_delay_s(UNAVAILABLE, 0, False, time.monotonic() + 0.5) is None
    assert policy.next_delay_s(UNAVAILABLE, 0, False, time.monotonic() + 5.0) == 1.0


def test_negative_settings_are_refused():
    with pytest.raises(ValueError, match="must not be negative"):
        RetryPolicy(retries=-1)


@pytest.fixture
def late_server(tiny_model_dir):
    """A control plane (and data plane) that starts listening on `port` half a second from now."""
    port = free_port()
    started = {}

    model = str(tiny_model_dir("qwen3"))

    def start():
        time.sleep(0.5)
        try:
            started["stack"] = InProcessStack(model, block_size=16, num_kv_blocks=32,
                                              control_plane_options=dict(port=port))
        except Exception as e:  # reported by the test, not lost on this thread
            started["error"] = e

    thread = threading.Thread(target=start)
    thread.start()
    yield f"127.0.0.1:{port}"
    thread.join(120)
    assert "error" not in started, started.get("error")
    started["stack"].close()


def test_sync_client_connects_once_the_server_is_up(late_server):
    with Client(late_server, retries=10, backoff_s=0.2, timeout_s=120) as client:
        result = client.generate("hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert result.finish_reason == "length" and len(result.token_ids) == 3


def test_async_client_connects_once_the_server_is_up(late_server):
    async def run():
        async with AsyncClient(late_server, retries=10, backoff_s=0.2, timeout_s=120) as client:
            return await client.generate("hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))

    assert asyncio.run(run()).finish_reason == "length"


def test_without_retries_an_absent_server_fails_at_once():
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout_s=30) as client:
        with pytest.raises(UnavailableError):
            client.generate("hello", SamplingParams(max_tokens=1))
        with pytest.raises(UnavailableError):
            client.model_info()
