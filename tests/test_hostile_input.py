"""Hostile input to the public port: each gets the right status with a sentence saying what to fix, the server
keeps serving, and no KV block or admission count leaks.

Oversized messages (gRPC's own RESOURCE_EXHAUSTED), bytes that are not a GenerateRequest
(garbage, truncated, nested past protobuf's limit, invalid UTF-8 in a string field:
INVALID_ARGUMENT from controlplane/serving/request_decoding.py), thousands of stop strings, huge n,
absurd but valid numbers (they must run, not crash the sampler), and requests on streams
the client already closed (raw HTTP/2 frames from tests/raw_http2.py, and cancels racing
the request).
"""
import struct
import time

import grpc
import pytest

from client import Client, ResourceExhaustedError, SamplingParams
from proto.nanoplane.v1 import generation_pb2 as pb
from tests import raw_http2 as h2
from tests.stack import InProcessStack

GENERATE = "/nanoplane.v1.Generation/Generate"
MAX_MESSAGE_BYTES = 2**20
FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
FLOAT32_TINY = struct.unpack("<f", b"\x01\x00\x00\x00")[0]  # the smallest positive subnormal


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=48, max_model_len=256,
                       control_plane_options=dict(max_message_bytes=MAX_MESSAGE_BYTES))
    yield s
    s.close()


@pytest.fixture
def unharmed(stack):
    """After the test: a normal request still works, and every block and admission count came back."""
    stack.wait_idle()
    start_free = stack.num_free_blocks()
    yield
    ok = stack.client.generate("Once upon a time", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3
    stack.wait_idle()
    deadline = time.monotonic() + 10
    while stack.metric("nanoplane:pending_tokens") and time.monotonic() < deadline:
        time.sleep(0.02)  # the servicer's finally (admission release) may trail the engine by a moment
    assert stack.metric("nanoplane:pending_tokens") == 0
    assert stack.num_free_blocks() == start_free
    stack.scheduler.check_invariants()


def send_raw(stack, data: bytes) -> tuple[grpc.StatusCode, str, int]:
    """Sends bytes as the request message of Generate: (status, details, number of responses)."""
    with grpc.insecure_channel(stack.target, options=[("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)(data, timeout=60)
        responses = []
        try:
            for r in call:
                responses.append(r)
        except grpc.RpcError as e:
            return e.code(), e.details() or "", len(responses)
        return grpc.StatusCode.OK, "", len(responses)


def request_bytes(**fields) -> bytes:
    sampling = fields.pop("sampling", {})
    return pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), **fields).SerializeToString()


def test_oversized_message_gets_resource_exhausted_from_grpc(stack, unharmed):
    code, details, _ = send_raw(stack, request_bytes(prompt="x" * (2 * MAX_MESSAGE_BYTES)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    with pytest.raises(ResourceExhaustedError) as err:  # the client library's view: no retry hint, it would not help
        stack.client.generate("x" * (2 * MAX_MESSAGE_BYTES), SamplingParams(max_tokens=1))
    assert err.value.retry_after_s is None


def nested_groups(depth: int) -> bytes:
    """An unknown field 99 as `depth` nested groups (wire types 3 and 4): protobuf parses groups recursively."""
    return b"\x9b\x06" * depth + b"\x9c\x06" * depth


UNDECODABLE = {
    "garbage": (b"\xff" * 64, "not a valid protobuf message"),
    "truncated varint": (b"\x0a\x80", "not a valid protobuf message"),
    "length past the end": (b"\x0a\x7fhello", "not a valid protobuf message"),
    "truncated valid request": (request_bytes(prompt="hello there", sampling=dict(max_tokens=2))[:-3],
                                "not a valid protobuf message"),
    "groups nested 101 deep": (nested_groups(101), "nested deeper than protobuf's limit"),
    "groups nested 100,000 deep": (nested_groups(100_000), "nested deeper than protobuf's limit"),
    "invalid UTF-8 in prompt": (b"\x0a\x03\xff\xfe\xfd", "must be valid UTF-8"),
    "invalid UTF-8 in request_id": (b"\x0a\x02hi\x2a\x02\xc3\x28", "must be valid UTF-8"),
    # messages { messages { role: "user" content: <lone surrogate, CESU-8 style> } }
    "invalid UTF-8 in a chat message": (b"\x1a\x0d\x0a\x0b\x0a\x04user\x12\x03\xed\xa0\x80", "must be valid UTF-8"),
    # sampling { stop: <overlong encoding of "/"> }
    "invalid UTF-8 in a stop string": (b"\x0a\x02hi\x22\x04\x2a\x02\xc0\xaf", "must be valid UTF-8"),
}


@pytest.mark.parametrize("name", UNDECODABLE)
def test_bytes_that_are_not_a_request_get_invalid_argument(stack, unharmed, name):
    data, says = UNDECODABLE[name]
    code, details, _ = send_raw(stack, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "nanoplane.v1.GenerateRequest" in details and says in details, details


BAD_VALUES = {
    "5,000 stop strings": (dict(stop=["stop"] * 5000), "sampling.stop: at most 64 stop strings, got 5000"),
    "a 100,000-character stop string": (dict(stop=["x" * 100_000]), "sampling.stop[0]"),
    "an empty stop string": (dict(stop=["ok", ""]), "sampling.stop[1]"),
    "10,000 stop token ids": (dict(stop_token_ids=[5] * 10_000), "sampling.stop_token_ids: at most 256"),
    "n of 2^31 - 1": (dict(n=2**31 - 1), "sampling.n: must be 1 to 16"),
    "negative n": (dict(n=-3), "sampling.n"),
    "max_tokens of 2^31 - 1": (dict(max_tokens=2**31 - 1), "sampling.max_tokens"),
    "temperature inf": (dict(temperature=float("inf")), "sampling.temperature"),
    "top_p nan": (dict(top_p=float("nan")), "sampling.top_p"),
    "min_p -inf": (dict(min_p=float("-inf")), "sampling.min_p"),
    "repetition_penalty 0": (dict(repetition_penalty=0.0), "sampling.repetition_penalty"),
    "presence_penalty float32 max": (dict(presence_penalty=FLOAT32_MAX), "sampling.presence_penalty"),
    "logprobs 2^31 - 1": (dict(logprobs=2**31 - 1), "sampling.logprobs"),
    "min_tokens past max_tokens": (dict(max_tokens=4, min_tokens=5), "sampling.min_tokens"),
    "negative seed": (dict(seed=-1), "sampling.seed"),
    "top_k int32 min": (dict(top_k=-2**31), "sampling.top_k"),
}


@pytest.mark.parametrize("name", BAD_VALUES)
def test_absurd_values_get_invalid_argument_naming_the_field(stack, unharmed, name):
    sampling, says = BAD_VALUES[name]
    code, details, _ = send_raw(stack, request_bytes(prompt="hi", sampling=sampling))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, (code, details)


@pytest.mark.parametrize("request_id, says", [("r" * 100_000, "at most 256 characters"),
                                              ("line\nbreak", "only printable characters"),
                                              ("nul\x00byte", "only printable characters")])
def test_request_id_that_would_flood_or_forge_log_lines_is_refused(stack, unharmed, request_id, says):
    code, details, _ = send_raw(stack, request_bytes(prompt="hi", request_id=request_id, sampling=dict(max_tokens=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"request_id: {says}" in details, details


EXTREME_BUT_VALID = {
    "temperature float32 max": dict(temperature=FLOAT32_MAX),
    "temperature subnormal": dict(temperature=FLOAT32_TINY),
    "top_p subnormal": dict(temperature=1.0, top_p=FLOAT32_TINY),
    "min_p 1": dict(temperature=1.0, min_p=1.0),
    "top_k int32 max": dict(temperature=1.0, top_k=2**31 - 1),
    "repetition_penalty float32 max": dict(temperature=1.0, repetition_penalty=FLOAT32_MAX),
    "repetition_penalty subnormal": dict(temperature=1.0, repetition_penalty=FLOAT32_TINY),
    "penalties at their bounds": dict(temperature=1.0, presence_penalty=-2.0, frequency_penalty=2.0),
    "seed int64 max": dict(temperature=1.0, seed=2**63 - 1),
    "64 stop strings of 512 characters": dict(stop=["\U0010ffff" * 512] * 64),
    "256 stop token ids": dict(stop_token_ids=list(range(256)), min_tokens=4),
    "n 16 with logprobs 20": dict(temperature=1.0, n=16, logprobs=20, prompt_logprobs=20),
}


@pytest.mark.parametrize("name", EXTREME_BUT_VALID)
def test_extreme_but_valid_values_generate(stack, unharmed, name):
    sampling = dict(max_tokens=4, ignore_eos=True, **EXTREME_BUT_VALID[name])
    code, details, num_responses = send_raw(stack, request_bytes(prompt="\x00 hi \U0001F600", sampling=sampling))
    assert code == grpc.StatusCode.OK, details
    assert num_responses >= sampling.get("n", 1)


def test_data_frame_after_the_client_ended_its_stream_is_ignored(stack, unharmed):
    """HTTP/2 forbids DATA on a stream the sender half-closed; gRPC drops it, the call runs to its end."""
    conn = h2.RawConnection("127.0.0.1", stack.control_plane.port)
    try:
        conn.grpc_headers(1, stack.target, GENERATE)
        body = request_bytes(prompt="hi", sampling=dict(max_tokens=40, ignore_eos=True))
        conn.send(h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(body)))
        conn.send(h2.frame(h2.DATA, 0, 1, h2.grpc_message(body)))  # on a half-closed stream
        conn.send(h2.frame(h2.DATA, h2.END_STREAM, 1, b"\x00" * 5))
        frames = conn.frames_until(lambda f: f.stream_id == 1 and (
            f.type == h2.RST_STREAM or (f.type == h2.HEADERS and f.flags & h2.END_STREAM)), timeout_s=30)
    finally:
        conn.close()
    ends = [f for f in frames if f.stream_id == 1 and f.type in (h2.HEADERS, h2.RST_STREAM)]
    assert ends and (ends[-1].type == h2.RST_STREAM or ends[-1].flags & h2.END_STREAM), frames[-5:]


def test_reset_stream_then_more_frames_on_it_aborts_the_request(stack, unharmed):
    """The client resets the stream mid-generation, then keeps sending on it: the request is aborted and its
    blocks freed; the late frames change nothing."""
    start_free = stack.num_free_blocks()
    conn = h2.RawConnection("127.0.0.1", stack.control_plane.port)
    try:
        conn.grpc_headers(1, stack.target, GENERATE)
        body = request_bytes(prompt="tell me a long story", sampling=dict(max_tokens=200, ignore_eos=True))
        conn.send(h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(body)))
        conn.frames_until(lambda f: f.type == h2.DATA and f.stream_id == 1)  # it is generating
        assert stack.num_free_blocks() < start_free
        conn.send(h2.frame(h2.RST_STREAM, 0, 1, struct.pack(">I", 0x8)))  # CANCEL
        conn.send(h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(body)))  # on a closed stream
        conn.grpc_headers(1, stack.target, GENERATE)  # and a stream id that may not be reused
        conn.frames_until(lambda f: f.type == h2.GOAWAY, timeout_s=1)  # gRPC ignores both; a GOAWAY would do too
        stack.wait_idle()  # with the connection still open: the reset alone aborted the request
        assert stack.num_free_blocks() == start_free
    finally:
        conn.close()


def test_connection_dropped_mid_generation_aborts_the_request(stack, unharmed):
    start_free = stack.num_free_blocks()
    conn = h2.RawConnection("127.0.0.1", stack.control_plane.port)
    conn.grpc_headers(1, stack.target, GENERATE)
    conn.send(h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(
        request_bytes(prompt="tell me a long story", sampling=dict(max_tokens=200, ignore_eos=True)))))
    conn.frames_until(lambda f: f.type == h2.DATA and f.stream_id == 1)
    conn.close()
    stack.wait_idle()
    assert stack.num_free_blocks() == start_free


def test_calls_cancelled_as_they_are_sent_leave_nothing_behind(stack, unharmed):
    """Each request arrives on a stream its client is already resetting: some are never seen by the servicer,
    some are admitted and then aborted; none may leak a block or an admission count."""
    with Client(stack.target, retries=0) as client:
        request = pb.GenerateRequest(prompt="cancel me", sampling=pb.SamplingParams(max_tokens=100, ignore_eos=True))
        for i in range(100):
            call = client.stub.Generate(request, timeout=30)
            if i % 2:
                time.sleep(0.001 * (i % 5))
            call.cancel()
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.CANCELLED


def test_a_closed_client_refuses_to_send(stack):
    client = Client(stack.target, retries=0)
    client.close()
    with pytest.raises(ValueError, match="Channel closed"):
        client.generate("hi", SamplingParams(max_tokens=1))
