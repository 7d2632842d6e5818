"""Chaos: the data plane is a real process, killed with SIGKILL under load and started again on the same port.

Nothing is lost: 32 greedy streams pause while it is away and finish with exactly the
tokens and text of an undisturbed run (the control plane held every token and re-prefilled
them), and every KV block comes back. Past --dataplane-reconnect-timeout-s the streams
end with UNAVAILABLE instead, new requests are refused at once, and the client library
retries a cut-off generation only when asked (retry_partial).
"""
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import Client, SamplingParams, UnavailableError
from tests.stack import TRANSPORTS, DataPlaneProcess, InProcessControlPlane

NUM_STREAMS = 32
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = [f"Stream {i} of the chaos test: once upon a time" for i in range(NUM_STREAMS)]
DATAPLANE_ARGS = ("--num-kv-blocks", "192", "--block-size", "16", "--max-num-seqs", "32", "--num-threads", "1")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataplane(tiny_model_dir, tmp_path_factory):
    dp = DataPlaneProcess(str(tiny_model_dir("qwen3")), tmp_path_factory.mktemp("chaos") / "dataplane.log",
                          *DATAPLANE_ARGS)
    yield dp
    dp.close()


@pytest.fixture(scope="module", params=TRANSPORTS)
def stack(dataplane, tiny_model_dir, request):
    s = InProcessControlPlane(dataplane.target, str(tiny_model_dir("qwen3")),
                              dict(dataplane_health_interval_s=0.5), transport=request.param)
    assert s.control_plane.model_info.dataplane_transport == request.param
    yield s
    s.close()


def serving(stack) -> bool:
    with grpc.insecure_channel(stack.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Streams:
    """NUM_STREAMS concurrent greedy streams on threads; counts tokens as they arrive."""

    def __init__(self, client: Client):
        self.tokens = {i: [] for i in range(NUM_STREAMS)}
        self.text = {i: "" for i in range(NUM_STREAMS)}
        self.finish = {}
        self.errors = {}
        self.num_tokens = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(client, i), daemon=True) for i in range(NUM_STREAMS)]
        for t in self._threads:
            t.start()

    def _run(self, client: Client, i: int) -> None:
        try:
            for delta in client.generate_stream(PROMPTS[i], GREEDY, timeout_s=120):
                with self._lock:
                    self.tokens[i] += delta.token_ids
                    self.text[i] += delta.text
                    self.num_tokens += len(delta.token_ids)
                if delta.finish_reason:
                    self.finish[i] = delta.finish_reason
        except Exception as e:  # recorded, and the test fails on it
            self.errors[i] = e

    def join(self) -> None:
        for t in self._threads:
            t.join(180)


def test_kill_9_mid_generation_loses_nothing(stack, dataplane):
    start_free = stack.num_free_blocks()
    reference = Streams(stack.client)
    reference.join()
    assert not reference.errors and all(len(t) == GREEDY.max_tokens for t in reference.tokens.values())

    streams = Streams(stack.client)
    wait_until(lambda: streams.num_tokens >= NUM_STREAMS * GREEDY.max_tokens // 3, 60, "the streams did not start")
    dataplane.kill()
    killed_at, killed_s = streams.num_tokens, time.monotonic()
    wait_until(lambda: not serving(stack), 5, "the control plane did not report NOT_SERVING")
    dataplane.start()  # a new process on the same port, with an empty KV cache
    restarted_s = time.monotonic()
    streams.join()
    print(f"\nchaos: {NUM_STREAMS} streams, SIGKILL after {killed_at} of {NUM_STREAMS * GREEDY.max_tokens} tokens, "
          f"data plane back after {restarted_s - killed_s:.1f} s, all done {time.monotonic() - killed_s:.1f} s "
          f"after the kill; errors {len(streams.errors)}, token mismatches "
          f"{sum(streams.tokens[i] != reference.tokens[i] for i in range(NUM_STREAMS))}")

    assert killed_at < NUM_STREAMS * GREEDY.max_tokens, "every stream had finished before the kill"
    assert streams.errors == {}
    assert streams.finish == {i: "length" for i in range(NUM_STREAMS)}
    assert streams.tokens == reference.tokens  # greedy: recompute gives the same tokens
    assert streams.text == reference.text  # the detokenizer state stayed
    assert stack.engine.reconnector.num_reconnects == 1
    stack.wait_idle()
    assert stack.num_free_blocks() == start_free
    stack.scheduler.check_invariants()
    wait_until(lambda: serving(stack), 10, "the control plane did not serve again")


def test_past_the_reconnect_timeout_requests_fail_with_unavailable(stack, dataplane):
    """Stream A (default client) fails with UNAVAILABLE after its tokens; B (retry_partial) starts over once the
    data plane is back and returns the whole greedy output; a request in the outage is refused at once."""
    stack.wait_idle()
    start_free = stack.num_free_blocks()
    reconnector = stack.engine.reconnector
    reconnector.timeout_s = 1.0
    long = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    expected = stack.client.generate(PROMPTS[0], long).token_ids
    outcome = {}

    def run(name, **options):
        with Client(stack.target, timeout_s=120, **options) as client:
            try:
                outcome[name] = client.generate(PROMPTS[0], long)
            except Exception as e:
                outcome[name] = e

    started = len(stack.scheduler.running)
    threads = [threading.Thread(target=run, args=("a",)),
               threading.Thread(target=run, args=("b",), kwargs=dict(retry_partial=True, retries=8, backoff_s=0.5))]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(stack.scheduler.running) >= started + 2, 30, "the two streams did not start")
        wait_until(lambda: all(s.num_completion_tokens > 0 for s in stack.scheduler.running), 30, "no tokens yet")
        dataplane.kill()
        threads[0].join(30)
        assert isinstance(outcome["a"], UnavailableError), outcome["a"]
        assert "--dataplane-reconnect-timeout-s" in outcome["a"].message
        with Client(stack.target, retries=0) as client:
            refused_at = time.monotonic()
            with pytest.raises(UnavailableError, match="unavailable for longer than"):
                client.generate("in the outage", SamplingParams(max_tokens=2))
            assert time.monotonic() - refused_at < 1.0
        assert not serving(stack)
        dataplane.start()
        threads[1].join(60)
    finally:
        reconnector.timeout_s = 60.0
    assert outcome["b"].token_ids == expected and outcome["b"].finish_reason == "length"
    wait_until(lambda: serving(stack), 10, "the control plane did not serve again")
    stack.wait_idle()
    assert stack.num_free_blocks() == start_free
