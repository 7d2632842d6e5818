"""--scheduling-policy priority end to end: a high-priority request behind 100 low-priority ones starts first."""
import threading
import time

import grpc
import pytest

from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc
from tests.stack import InProcessStack


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), dict(scheduling_policy="priority"), block_size=16,
                       num_kv_blocks=128, max_num_seqs=8, num_threads=1)
    yield s
    s.close()


def request(prompt: str, priority: int, max_tokens: int = 8) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=prompt, priority=priority, sampling=generation_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))


def test_a_high_priority_request_gets_its_first_token_before_100_low_priority_ones(stack):
    first_token_at, finish, errors = {}, {}, {}  # monotonic time of each request's first token
    with grpc.insecure_channel(stack.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        def run(name, req):
            try:
                for response in stub.Generate(req, timeout=120):
                    if response.token_ids and name not in first_token_at:
                        first_token_at[name] = time.monotonic()
                    if response.finish_reason:
                        finish[name] = response.finish_reason
            except grpc.RpcError as e:
                errors[name] = e

        threads = [threading.Thread(target=run, args=(f"low{i}", request(f"Low priority {i}", 5)))
                   for i in range(100)]
        for t in threads:
            t.start()
        while stack.scheduler.num_waiting < 60:  # most of the 100 queue behind the 8 batch slots
            time.sleep(0.01)
        num_waiting, sent = stack.scheduler.num_waiting, time.monotonic()
        run("high", request("Urgent", -5))
        for t in threads:
            t.join(120)
    assert errors == {}
    assert len(finish) == 101  # the low-priority ones still finish
    high = first_token_at["high"]
    lows_after = sum(first_token_at[f"low{i}"] > high for i in range(100))
    print(f"\npriority: sent behind {num_waiting} waiting low-priority requests, the high-priority one's TTFT "
          f"{(high - sent) * 1e3:.0f} ms; {lows_after} of 100 low-priority ones got their first token after it; "
          f"the last low-priority first token {(max(first_token_at.values()) - sent) * 1e3:.0f} ms after it was sent")
    # the ones waiting when it arrived start after it, but for those admitted in the step it waited for
    assert lows_after >= num_waiting - stack.scheduler.config.max_num_seqs


def test_priority_without_the_priority_policy_is_refused(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=32, num_threads=1)
    try:
        with grpc.insecure_channel(s.target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                list(generation_pb2_grpc.GenerationStub(channel).Generate(request("x", 1), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--scheduling-policy priority" in refused.value.details()
    finally:
        s.close()
