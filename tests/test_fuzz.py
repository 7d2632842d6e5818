"""Fuzzing the public port with hypothesis: every GenerateRequest field, then raw bytes, sent to Generate.

Every answer must be OK (a stream that ends with finish_reason), INVALID_ARGUMENT with a
sentence (never gRPC's "Unexpected <class ...>"), or RESOURCE_EXHAUSTED where a limit is the
reason; afterwards the server answers a normal request and no KV block or admission count
is left behind. Deterministic (derandomize, no example database) and bounded in examples.
"""
import math
import struct
import time
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from client import SamplingParams
from proto.nanoplane.v1 import generation_pb2 as pb
from tests.stack import InProcessStack

GENERATE = "/nanoplane.v1.Generation/Generate"
VOCAB = 49152
FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
INT32 = (-2**31, 2**31 - 1)
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=250, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED = Counter()  # (test, status) -> inputs, printed for docs/reliability.md


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    # a short model length keeps unset max_tokens (= all the room left) cheap to generate
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=64, max_model_len=64,
                       max_num_seqs=32)
    yield s
    s.close()
    print("\nfuzz inputs tried: " + ", ".join(f"{test} {status}: {n}" for (test, status), n in sorted(TRIED.items())))


@pytest.fixture(scope="module")
def raw_generate(stack):
    channel = grpc.insecure_channel(stack.target)
    yield channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
    channel.close()


floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, math.nan, math.inf, -math.inf,
                                                           FLOAT32_MAX, -FLOAT32_MAX, 1e-45]))
int32s = st.one_of(st.integers(*INT32), st.integers(-2, 20), st.sampled_from(INT32))
texts = st.text(max_size=30)  # hypothesis leaves out lone surrogates, which protobuf cannot even hold


def sometimes_huge(element, sizes=(65, 257, 5000)):
    """A short list, or one element repeated past a limit (thousands of stop strings)."""
    return st.one_of(st.lists(element, max_size=4),
                     st.builds(lambda x, k: [x] * k, element, st.sampled_from(sizes)))


SAMPLING_FIELDS = {
    "temperature": floats, "top_p": floats, "min_p": floats, "repetition_penalty": floats,
    "presence_penalty": floats, "frequency_penalty": floats,
    "top_k": int32s, "logprobs": int32s, "prompt_logprobs": int32s, "min_tokens": int32s,
    "max_tokens": st.one_of(int32s, st.integers(1, 6)),
    "n": st.one_of(int32s, st.integers(1, 4)),
    "seed": st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(0, 10)),
    "stop": sometimes_huge(st.one_of(texts, st.text(min_size=500, max_size=600))),
    "stop_token_ids": sometimes_huge(st.one_of(st.integers(*INT32), st.integers(0, VOCAB + 5))),
    "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
}
# within every limit, so the generation path itself (sampler, stop checks, n, logprobs) meets odd mixes
PLAUSIBLE_FIELDS = {
    "temperature": st.floats(0, 5, width=32), "top_p": st.floats(0.0625, 1, width=32),
    "min_p": st.floats(0, 1, width=32), "repetition_penalty": st.floats(0.0625, 4, width=32),
    "presence_penalty": st.floats(-2, 2, width=32), "frequency_penalty": st.floats(-2, 2, width=32),
    "top_k": st.one_of(st.just(-1), st.integers(1, VOCAB + 10)), "logprobs": st.integers(0, 20),
    "prompt_logprobs": st.integers(0, 20), "min_tokens": st.integers(0, 2), "max_tokens": st.integers(2, 6),
    "n": st.integers(1, 4), "seed": st.integers(0, 2**63 - 1), "stop": st.lists(st.text(min_size=1, max_size=4),
                                                                             max_size=3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=4),
    "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
}
sampling_params = st.one_of(st.fixed_dictionaries({}, optional=SAMPLING_FIELDS),
                            st.fixed_dictionaries({}, optional=PLAUSIBLE_FIELDS)).map(lambda d: pb.SamplingParams(**d))
token_ids = st.one_of(st.lists(st.integers(0, VOCAB - 1), max_size=80), st.lists(st.integers(*INT32), max_size=8))
chat = st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]),
                                                         texts), content=st.text(max_size=60)), max_size=4)
inputs = st.one_of(
    st.just({}),
    st.builds(lambda t: {"prompt": t}, st.text(max_size=120)),
    st.builds(lambda ids: {"prompt_token_ids": pb.TokenIds(ids=ids)}, token_ids),
    st.builds(lambda m, add: {"messages": pb.ChatMessages(messages=m, **({} if add is None else
                                                                         {"add_generation_prompt": add}))},
              chat, st.one_of(st.none(), st.booleans())),
)
request_ids = st.one_of(st.just(""), st.text(st.characters(codec="ascii", min_codepoint=32), max_size=40),
                        st.text(max_size=300))
requests = st.builds(lambda i, s, rid: pb.GenerateRequest(sampling=s, request_id=rid, **i),
                     inputs, st.one_of(st.none(), sampling_params), request_ids)


def mutated(data: bytes, where: int, how: int, byte: int) -> bytes:
    """A valid request's bytes with one byte flipped, cut short, or one inserted."""
    if not data:
        return bytes([byte])
    where %= len(data)
    head, tail = data[:where], data[where:]
    return [head + bytes([byte]) + tail[1:], head, head + bytes([byte]) + tail][how]


raw_bytes = st.one_of(st.binary(max_size=300),
                      st.builds(mutated, requests.map(lambda r: r.SerializeToString()), st.integers(0, 10**6),
                                st.integers(0, 2), st.integers(0, 255)))


def check_answer(raw_generate, data: bytes, test: str) -> None:
    call = raw_generate(data, timeout=60)
    responses = []
    try:
        for r in call:
            responses.append(pb.GenerateResponse.FromString(r))
        status, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        status, details = e.code(), e.details() or ""
    TRIED[(test, status.name)] += 1
    if status == grpc.StatusCode.OK:
        assert responses and responses[-1].finish_reason in ("stop", "length"), responses[-1:]
    elif status == grpc.StatusCode.INVALID_ARGUMENT:
        assert details and "Unexpected" not in details, details
    else:
        limit = "overloaded" in details or "larger than max" in details  # admission, or gRPC's message size
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED and limit, (status, details)


def assert_unharmed(stack, start_free: int) -> None:
    ok = stack.client.generate("Once upon a time", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert ok.finish_reason == "length"
    stack.wait_idle(30)
    deadline = time.monotonic() + 10
    while stack.metric("nanoplane:pending_tokens") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.metric("nanoplane:pending_tokens") == 0
    assert stack.num_free_blocks() == start_free
    stack.scheduler.check_invariants()


def test_fuzzed_generate_requests_get_ok_or_invalid_argument(stack, raw_generate):
    start_free = stack.num_free_blocks()

    @FUZZ
    @given(requests)
    def fuzz(request):
        check_answer(raw_generate, request.SerializeToString(), "fields")

    fuzz()
    assert_unharmed(stack, start_free)


def test_fuzzed_raw_bytes_get_ok_or_invalid_argument(stack, raw_generate):
    start_free = stack.num_free_blocks()

    @FUZZ
    @given(raw_bytes)
    def fuzz(data):
        check_answer(raw_generate, data, "bytes")

    fuzz()
    assert_unharmed(stack, start_free)
