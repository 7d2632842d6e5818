"""The OpenAI-compatible HTTP gateway in front of both planes: the official `openai` package as a user
would drive it (streaming and not, usage, stop, n, seed), and OpenAI's error shape checked with http.client."""
import asyncio
import http.client
import json

import pytest

from client import SamplingParams
from tests.stack import InProcessStack

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    from gateway.http_gateway import start_http_gateway

    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=64)
    s.gateway = asyncio.run_coroutine_threadsafe(start_http_gateway(s.target, "127.0.0.1", 0,
                                                                    max_body_bytes=64 * 1024), s.loop).result(30)
    yield s
    asyncio.run_coroutine_threadsafe(s.gateway.stop(), s.loop).result(30)
    s.close()


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.gateway.port}/v1", api_key="x", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


def request(stack, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def assert_openai_error(status_body, status: int, param=None, message=None):
    got_status, _, body = status_body
    assert got_status == status, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if message is not None:
        assert message in error["message"], error
    return error


def test_models_lists_the_served_model(stack, oai, model):
    assert model == stack.client.model_info().model_name
    assert oai.models.retrieve(model).id == model


def test_chat_completion_streams_and_matches_the_non_streaming_one(stack, oai, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    direct = stack.client.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert full.choices[0].message.content == direct.text
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens == direct.usage.prompt_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one lump
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_streams_with_stop_and_max_completion_tokens(oai, model):
    full = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert full.object == "text_completion" and full.usage.completion_tokens == 16 and len(text) > 6
    chunks = list(oai.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == "length"
    stop = text[3:6]
    stopped = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0,
                                     stop=[stop], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[:text.find(stop)]
    short = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                        max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3


def test_n_seed_and_several_prompts(oai, model):
    kwargs = dict(model=model, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    a = oai.completions.create(prompt=["Hello", "The sky"], n=2, **kwargs)
    b = oai.completions.create(prompt=["Hello", "The sky"], n=2, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert a.usage.completion_tokens == 4 * 8
    chat = list(oai.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], n=2, stream=True,
                                            **kwargs))
    assert {c.choices[0].index for c in chat if c.choices} == {0, 1}


def test_malformed_and_invalid_requests_get_400_in_openai_shape(stack, model):
    assert_openai_error(request(stack, "POST", "/v1/completions", b"{not json"), 400, message="not valid JSON")
    assert_openai_error(request(stack, "POST", "/v1/completions", b"[1, 2]"), 400, message="JSON object")
    assert_openai_error(request(stack, "POST", "/v1/chat/completions", b"{}"), 400, param="messages")

    def post(path, **body):
        return request(stack, "POST", path, json.dumps({"model": model, **body}).encode())

    assert_openai_error(post("/v1/completions", prompt="hi", temperature=-1), 400, param="temperature")
    assert_openai_error(post("/v1/completions", prompt="hi", temperature="hot"), 400, param="temperature")
    assert_openai_error(post("/v1/completions", prompt="hi", max_tokens=0), 400, param="max_tokens")
    error = assert_openai_error(post("/v1/completions", prompt="hi", max_tokens=100_000), 400, param="max_tokens")
    assert "ask for at most" in error["message"]  # the server's own message
    assert_openai_error(post("/v1/completions", prompt=[]), 400, param="prompt")
    assert_openai_error(post("/v1/completions", prompt="hi", n=0), 400, param="n")
    assert_openai_error(post("/v1/chat/completions", messages=[{"role": "wizard", "content": "hi"}]), 400,
                        param="messages")
    assert_openai_error(post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], top_p=0,
                             stream=True), 400, param="top_p")  # rejected before the stream starts
    assert_openai_error(post("/v1/completions", prompt="hi", stream_options={"include_usage": True}), 400,
                        param="stream_options")
    assert_openai_error(post("/v1/completions", prompt="hi", model="gpt-4"), 404, param="model")


def test_http_framing_errors(stack):
    assert_openai_error(request(stack, "GET", "/v2/nothing"), 404)
    status, headers, _ = request(stack, "GET", "/v1/completions")
    assert status == 405 and dict(headers)["Allow"] == "POST"
    assert_openai_error(request(stack, "POST", "/v1/completions", b"x" * (64 * 1024 + 1)), 413)
    assert_openai_error(request(stack, "POST", "/v1/completions", b""), 400, message="empty")


def test_openai_client_raises_typed_errors(oai, model):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, prompt="hi", top_p=5)
    assert e.value.status_code == 400 and "top_p" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="hi")


def test_logprobs_and_vllm_sampling_fields(oai, model):
    completion = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=5, logprobs=2,
                                        extra_body={"ignore_eos": True, "min_p": 0.01})
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) == 2 for top in lp.top_logprobs)
    # tokens by their text: together they spell the completion (unless one is a piece of a multi-byte character)
    assert not any(t.startswith("token_id:") for t in lp.tokens)
    assert "".join(lp.tokens) == completion.choices[0].text or any("\ufffd" in t for t in lp.tokens)
    assert all(x <= 0 for x in lp.token_logprobs)
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=0.5,
                                       extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.bytes == list(c.token.encode()) and c.token and not c.token.startswith("token_id:")
               for c in content)
    streamed = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, logprobs=True, stream=True,
                                                extra_body={"ignore_eos": True}))
    assert sum(len(c.choices[0].logprobs.content) for c in streamed if c.choices and c.choices[0].logprobs) == 4
    plain = oai.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_unsupported_fields_are_refused(stack, model):
    body = json.dumps({"model": model, "prompt": "hi", "logit_bias": {"5": 10}}).encode()
    assert_openai_error(request(stack, "POST", "/v1/completions", body), 400, param="logit_bias",
                        message="not supported yet")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}).encode()
    assert_openai_error(request(stack, "POST", "/v1/chat/completions", body), 400, param="top_logprobs")


def test_forwards_the_callers_bearer_token(tiny_model_dir, monkeypatch):
    from gateway.http_gateway import start_http_gateway

    monkeypatch.setenv("NANOPLANE_CP_AUTH_TOKENS", "secret-token")
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=32)
    gateway = asyncio.run_coroutine_threadsafe(start_http_gateway(s.target, "127.0.0.1", 0), s.loop).result(30)
    try:
        base_url = f"http://127.0.0.1:{gateway.port}/v1"
        good = openai.OpenAI(base_url=base_url, api_key="secret-token", max_retries=0)
        model = good.models.list().data[0].id
        assert good.completions.create(model=model, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        wrong = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=model, prompt="Hi")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    finally:
        asyncio.run_coroutine_threadsafe(gateway.stop(), s.loop).result(30)
        s.close()
