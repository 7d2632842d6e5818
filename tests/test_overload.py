"""Overload: admission bounds answer RESOURCE_EXHAUSTED at once with a retry hint; KV exhaustion preempts and
still finishes everything, oldest first.

Admission (controlplane/serving/admission.py): one batch slot, so the second and later requests
wait; --max-waiting-requests 2 and --max-pending-tokens 1200 are then easy to reach.
KV exhaustion: eight requests that need 24 blocks together share 12; the scheduler preempts
the newest, so every request finishes with the tokens it gets alone, and they finish in the
order they arrived (the oldest is never starved).
"""
import threading
import time

import grpc
import pytest

from client import ResourceExhaustedError, SamplingParams
from proto.nanoplane.v1 import generation_pb2 as pb
from tests.stack import InProcessStack

MAX_WAITING = 2
MAX_PENDING_TOKENS = 1200
LONG = pb.SamplingParams(max_tokens=490, temperature=0, ignore_eos=True)
SHORT = pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=128, max_num_seqs=1,
                       control_plane_options=dict(max_waiting_requests=MAX_WAITING,
                                                  max_pending_tokens=MAX_PENDING_TOKENS))
    yield s
    s.close()


class Held:
    """Requests started on the raw stub and left running until close() cancels them."""

    def __init__(self, stack):
        self.stack = stack
        self.calls = []

    def start(self, sampling: pb.SamplingParams, prompt: str) -> None:
        call = self.stack.client.stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=sampling), timeout=60)
        self.calls.append(call)

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self.stack.wait_idle()
        wait_until(lambda: self.stack.metric("nanoplane:pending_tokens") == 0, "admission kept pending tokens")


@pytest.fixture
def held(stack):
    stack.wait_idle()
    start_free = stack.num_free_blocks()
    h = Held(stack)
    yield h
    h.close()
    assert stack.num_free_blocks() == start_free
    ok = stack.client.generate("after the overload", SamplingParams(max_tokens=2))  # admitted again
    assert ok.finish_reason in ("length", "stop")


def refused(stack, sampling: pb.SamplingParams) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.stub.Generate(pb.GenerateRequest(prompt="one too many", sampling=sampling), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert dict(err.value.trailing_metadata())["retry-after-ms"] == "1000"
    assert "retry after 1000 ms" in err.value.details()
    return err.value


def test_past_max_waiting_requests_is_refused_at_once_with_a_retry_hint(stack, held):
    rejected = stack.metric("nanoplane:requests_rejected_total")
    held.start(LONG, "the one running")
    wait_until(lambda: stack.engine.num_running_requests == 1, "the first request did not start")
    for i in range(MAX_WAITING):
        held.start(SHORT, f"waiting {i}")
    wait_until(lambda: stack.scheduler.num_waiting == MAX_WAITING, "the others did not queue")
    error = refused(stack, SHORT)
    assert "--max-waiting-requests" in error.details()
    with pytest.raises(ResourceExhaustedError) as err:  # the client library's view of it
        stack.client.generate("one too many", SamplingParams(max_tokens=8))
    assert err.value.retry_after_s == 1.0
    assert stack.metric("nanoplane:requests_rejected_total") == rejected + 2
    assert stack.scheduler.num_running == 1  # the running one was not disturbed


def test_past_max_pending_tokens_is_refused_at_once(stack, held):
    held.start(LONG, "the one running")
    wait_until(lambda: stack.engine.num_running_requests == 1, "the first request did not start")
    held.start(LONG, "a second long one fits")  # 2 × ~500 tokens < 1200
    wait_until(lambda: stack.scheduler.num_waiting == 1, "the second did not queue")
    error = refused(stack, LONG)  # a third would make ~1500
    assert "--max-pending-tokens" in error.details() and str(MAX_PENDING_TOKENS) in error.details()


def test_a_request_alone_over_max_pending_tokens_still_runs(stack, held):
    """n = 3 × 490 tokens is over the bound by itself: refused only when something else is pending."""
    big = pb.SamplingParams(max_tokens=490, n=3, temperature=1.0, seed=1, ignore_eos=True)
    held.start(big, "big alone")
    wait_until(lambda: stack.engine.num_running_requests == 1, "the big request was not admitted")
    refused(stack, SHORT)


@pytest.fixture(scope="module")
def small_kv(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=12, max_num_seqs=8)
    yield s
    s.close()


def test_kv_exhaustion_preempts_and_finishes_everything_oldest_first(small_kv):
    """8 requests × 48 tokens = 24 blocks of 16 against 12: preemption by recompute, no livelock, FIFO."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [[100 + 7 * i + j for j in range(8)] for i in range(8)]  # equal lengths, no shared prefix
    alone = [small_kv.client.generate(p, params).token_ids for p in prompts]

    scheduler = small_kv.scheduler
    finish_order, preempted = [], {}
    real_finish = scheduler.finish

    def finish(seq, reason):  # a spy on the engine thread: the real finish runs unchanged
        finish_order.append(seq.request_id)
        preempted[seq.request_id] = seq.num_preemptions
        real_finish(seq, reason)

    scheduler.finish = finish
    start_preemptions = scheduler.num_preemptions
    results = {}

    def run(i):
        results[i] = small_kv.client.generate(prompts[i], params, request_id=f"kv-{i}")

    threads = []
    try:
        for i in range(len(prompts)):  # one at a time, so arrival order is request order
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
            wait_until(lambda: f"kv-{i}" in {s.request_id for s in scheduler.seqs.values()} or i in results,
                       f"request {i} did not arrive")
        for t in threads:
            t.join(120)
    finally:
        del scheduler.finish
    print(f"\nKV exhaustion: {len(prompts)} requests, {scheduler.num_preemptions - start_preemptions} preemptions, "
          f"finish order {finish_order}")
    assert [results[i].token_ids for i in range(len(prompts))] == alone
    assert all(results[i].finish_reason == "length" for i in range(len(prompts)))
    assert scheduler.num_preemptions > start_preemptions
    assert finish_order == [f"kv-{i}" for i in range(len(prompts))]
    assert preempted["kv-0"] == 0
    small_kv.wait_idle()
    assert small_kv.num_free_blocks() == 12
