"""The public API through the client library against both planes: streaming, stop strings,
cancellation, bad input (INVALID_ARGUMENT naming the field) and no leaked KV blocks."""
import math
import threading
import time

import grpc
import numpy as np
import pytest

from client import InvalidArgumentError, SamplingParams
from proto.nanoplane.v1 import generation_pb2
from tests.stack import TRANSPORTS, InProcessStack


@pytest.fixture(scope="module", params=TRANSPORTS)
def stack(tiny_model_dir, request):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=64, transport=request.param)
    yield s
    s.close()


def test_generate_stream_streams_deltas(stack):
    deltas = list(stack.client.generate_stream("Once upon a time", SamplingParams(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True)))
    assert len(deltas) >= 2
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 8
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert sum(len(d.token_ids) for d in deltas) == 8


def test_stop_string_spanning_tokens_is_not_emitted(stack):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = stack.client.generate("The weather today", params)
    text = full.text
    assert len(text) > 12
    stop = text[5:12]  # a piece of the middle that may span several tokens
    first = text.find(stop)
    stopped = stack.client.generate("The weather today", SamplingParams(max_tokens=24, temperature=0,
                                                                         ignore_eos=True, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:first]


def test_seeded_sampling_repeats(stack):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = stack.client.generate("Hello", params)
    b = stack.client.generate("Hello", params)
    assert a.token_ids == b.token_ids


def test_tokenize_and_model_info(stack):
    ids = stack.client.tokenize("Hello world")
    assert ids and all(isinstance(t, int) for t in ids)
    chat_ids = stack.client.tokenize(messages=[{"role": "user", "content": "Hi"}])
    assert len(chat_ids) > len(stack.client.tokenize("Hi"))
    info = stack.client.model_info()
    assert info.architecture == "qwen3" and info.block_size == 16
    assert stack.control_plane.model_info.dataplane_transport in ("grpc", "shm")  # what GetModelInfo returns
    assert info.kv_capacity_tokens == 64 * 16 and info.max_model_len > 0


def _bad(**sampling):
    return generation_pb2.GenerateRequest(prompt="hi", sampling=generation_pb2.SamplingParams(**sampling))


BAD_REQUESTS = {
    "no input": (generation_pb2.GenerateRequest(), "input"),
    "empty prompt": (generation_pb2.GenerateRequest(prompt=""), "prompt"),
    "empty token ids": (generation_pb2.GenerateRequest(prompt_token_ids=generation_pb2.TokenIds(ids=[])),
                        "prompt_token_ids"),
    "token id too big": (generation_pb2.GenerateRequest(prompt_token_ids=generation_pb2.TokenIds(ids=[5, 10**6])),
                         "prompt_token_ids[1]"),
    "negative token id": (generation_pb2.GenerateRequest(prompt_token_ids=generation_pb2.TokenIds(ids=[-1])),
                          "prompt_token_ids[0]"),
    "prompt longer than the KV cache": (
        generation_pb2.GenerateRequest(prompt_token_ids=generation_pb2.TokenIds(ids=[7] * 5000)), "prompt_token_ids"),
    "max_tokens 0": (_bad(max_tokens=0), "sampling.max_tokens"),
    "max_tokens negative": (_bad(max_tokens=-5), "sampling.max_tokens"),
    "max_tokens too many": (_bad(max_tokens=10**6), "sampling.max_tokens"),
    "temperature negative": (_bad(temperature=-0.5), "sampling.temperature"),
    "temperature nan": (_bad(temperature=math.nan), "sampling.temperature"),
    "top_p zero": (_bad(top_p=0.0), "sampling.top_p"),
    "top_p above one": (_bad(top_p=1.5), "sampling.top_p"),
    "top_k below -1": (_bad(top_k=-2), "sampling.top_k"),
    "stop token id outside vocab": (_bad(stop_token_ids=[10**7]), "sampling.stop_token_ids[0]"),
    "unknown chat role": (generation_pb2.GenerateRequest(messages=generation_pb2.ChatMessages(
        messages=[generation_pb2.ChatMessage(role="wizard", content="hi")])), "messages[0].role"),
    "no chat messages": (generation_pb2.GenerateRequest(messages=generation_pb2.ChatMessages()), "messages"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_gets_invalid_argument_naming_the_field(stack, name):
    request, field = BAD_REQUESTS[name]
    start_free = stack.num_free_blocks()
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.stub.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    # the server keeps serving and nothing leaked
    ok = stack.client.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0))
    assert ok.finish_reason in ("length", "stop")
    stack.wait_idle()
    assert stack.num_free_blocks() == start_free


def test_client_raises_typed_errors(stack):
    with pytest.raises(InvalidArgumentError, match="sampling.top_p"):
        stack.client.generate("hi", SamplingParams(top_p=2.0))


def test_model_length_limit_names_the_limit(stack):
    max_len = stack.client.model_info().max_model_len
    request = generation_pb2.GenerateRequest(prompt_token_ids=generation_pb2.TokenIds(ids=[7] * max_len))
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.stub.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(max_len) in err.value.details() or "KV cache" in err.value.details()


def test_cancelled_stream_frees_its_blocks(stack):
    stack.wait_idle()
    start_free = stack.num_free_blocks()
    prompt = np.random.default_rng(0).integers(3, 49152, 40).tolist()
    stream = stack.client.generate_stream(prompt, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    next(stream)
    next(stream)
    assert stack.num_free_blocks() < start_free  # the sequence holds blocks while it runs
    stream.close()  # cancels the RPC
    deadline = time.monotonic() + 10
    while stack.num_free_blocks() != start_free and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.num_free_blocks() == start_free
    assert not stack.scheduler.has_unfinished()


def test_deadline_exceeded_frees_blocks(stack):
    stack.wait_idle()
    start_free = stack.num_free_blocks()
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.stub.Generate(generation_pb2.GenerateRequest(
            prompt="tell me a story", sampling=generation_pb2.SamplingParams(max_tokens=400, ignore_eos=True)),
            timeout=0.25))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stack.wait_idle()
    assert stack.num_free_blocks() == start_free


def test_many_concurrent_streams_all_finish(stack):
    results = {}

    def run(i):
        results[i] = stack.client.generate(f"request {i}", SamplingParams(max_tokens=5, temperature=0.8, seed=i,
                                                                          ignore_eos=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(results) == 12 and all(r.usage.completion_tokens == 5 for r in results.values())
