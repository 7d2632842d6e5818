"""The OpenAI-compatible HTTP gateway in front of both planes: the official `openai` package as a user
would drive it (streaming and not, usage, stop, n, seed), OpenAI's error shape checked with http.client,
the probes that need no key, CORS and the OpenAPI schema."""
import asyncio
import http.client
import json
import time

import pytest

from client import SamplingParams
from tests.stack import InProcessStack, free_port

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from gateway.config import GatewayConfig  # noqa: E402
from gateway.http_gateway import start_http_gateway  # noqa: E402


def start_gateway(stack, target: str | None = None, **options):
    config = GatewayConfig(target or stack.target, http_port=0, **options)
    return asyncio.run_coroutine_threadsafe(start_http_gateway(config), stack.loop).result(30)


def stop_gateway(stack, gateway) -> None:
    asyncio.run_coroutine_threadsafe(gateway.stop(), stack.loop).result(30)


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=64)
    s.gateway = start_gateway(s, max_body_bytes=64 * 1024)
    yield s
    stop_gateway(s, s.gateway)
    s.close()


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.gateway.port}/v1", api_key="x", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


def request(stack, method: str, path: str, body=None, headers: dict | None = None, port: int | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port or stack.gateway.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})},
                     encode_chunked=body is not None and not isinstance(body, bytes))
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
    status, headers, body = request(stack, "GET", "/v1/completions")
    assert_openai_error((status, headers, body), 405)
    assert dict(headers)["allow"] == "POST"
    assert_openai_error(request(stack, "POST", "/v1/completions", b""), 400, message="empty")


def test_oversized_bodies_get_413(stack, model):
    limit = 64 * 1024
    big = json.dumps({"model": model, "prompt": "x" * limit}).encode()
    assert_openai_error(request(stack, "POST", "/v1/completions", big), 413, message=str(limit))
    # chunked, so without a Content-Length: counted as it comes
    error = assert_openai_error(request(stack, "POST", "/v1/completions", iter([big[:40_000], big[40_000:]])), 413)
    assert error["code"] == "body_too_large"
    small = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2}).encode()
    status, _, body = request(stack, "POST", "/v1/completions", iter([small[:10], small[10:]]))
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1  # a small chunked body is fine


def test_bodies_that_do_not_fit_the_models_get_400_naming_the_field(stack, model):
    def post(path, body):
        return request(stack, "POST", path, json.dumps(body).encode())

    error = assert_openai_error(post("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": "12"}), 400,
                                param="max_tokens")
    assert error["type"] == "invalid_request_error" and "integer" in error["message"]
    assert_openai_error(post("/v1/completions", {"model": model, "prompt": "hi", "stream": 1}), 400, param="stream")
    assert_openai_error(post("/v1/completions", {"model": model, "prompt": [1, "a"]}), 400, param="prompt",
                        message="prompt: must be a string, a non-empty list of strings")
    assert_openai_error(post("/v1/completions", {"model": model}), 400, param="prompt", message="prompt: is required")
    error = assert_openai_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}), 400,
                                param="messages")
    assert error["message"].startswith("messages[0].content: must be a string or a list of text parts")
    assert_openai_error(post("/v1/chat/completions", {"messages": [{"content": "hi"}]}), 400, param="messages",
                        message="messages[0].role: is required")
    assert_openai_error(request(stack, "POST", "/v1/completions", b'{"prompt": "hi"'), 400,
                        message="not valid JSON")


def test_probes_answer_without_a_key_and_readiness_follows_the_control_plane(stack):
    status, _, body = request(stack, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = request(stack, "GET", "/ready")
    assert status == 200 and json.loads(body) == {"status": "ready"}
    nowhere = start_gateway(stack, target=f"127.0.0.1:{free_port()}")  # no control plane there
    try:
        assert request(stack, "GET", "/health", port=nowhere.port)[0] == 200  # alive: not restarted for that
        error = assert_openai_error(request(stack, "GET", "/ready", port=nowhere.port), 503)
        assert error["code"] == "not_ready" and "does not answer" in error["message"]
    finally:
        stop_gateway(stack, nowhere)


def test_openapi_schema_and_docs(stack):
    status, _, body = request(stack, "GET", "/openapi.json")
    schema = json.loads(body)
    assert status == 200 and schema["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready"} <= set(schema["paths"])
    components = schema["components"]["schemas"]
    assert {"min_p", "ignore_eos", "prompt"} <= set(components["CompletionRequest"]["properties"])
    assert "messages" in components["ChatCompletionRequest"]["required"]
    assert set(components["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    status, headers, body = request(stack, "GET", "/docs")
    assert status == 200 and dict(headers)["content-type"].startswith("text/html") and b"openapi.json" in body


def test_cors_only_for_the_configured_origins(stack):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = request(stack, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in dict(headers)  # off by default
    gateway = start_gateway(stack, cors_allowed_origins="https://app.example, https://other.example")
    try:
        status, headers, _ = request(stack, "OPTIONS", "/v1/chat/completions", headers=preflight, port=gateway.port)
        headers = dict(headers)
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers, _ = request(stack, "OPTIONS", "/v1/chat/completions", port=gateway.port,
                                     headers={**preflight, "Origin": "https://evil.example"})
        assert status == 400 and "access-control-allow-origin" not in dict(headers)
        status, headers, _ = request(stack, "GET", "/v1/models", headers={"Origin": "https://other.example"},
                                     port=gateway.port)
        assert status == 200 and dict(headers)["access-control-allow-origin"] == "https://other.example"
    finally:
        stop_gateway(stack, gateway)


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
    monkeypatch.setenv("NANOPLANE_CP_AUTH_TOKENS", "secret-token")
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=32)
    gateway = s.gateway = start_gateway(s)
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
        assert_openai_error(request(s, "GET", "/v1/models"), 401)  # no key at all
        for probe, status in (("/health", {"status": "ok"}), ("/ready", {"status": "ready"})):  # no key needed
            got = request(s, "GET", probe)
            assert got[0] == 200 and json.loads(got[2]) == status, got
        assert request(s, "GET", "/openapi.json")[0] == 200
    finally:
        stop_gateway(s, gateway)
        s.close()


def test_a_client_that_goes_away_mid_stream_aborts_its_request(stack, model):
    def aborted() -> float:
        try:
            return stack.metric('nanoplane:request_success_total{finished_reason="abort"}')
        except KeyError:
            return 0.0

    before = aborted()
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 500, "stream": True,
                       "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway.port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert response.readline().startswith(b"data: {")
    conn.sock.shutdown(2)  # gone, long before 500 tokens
    conn.close()
    deadline = time.monotonic() + 30
    while aborted() < before + 1:
        assert time.monotonic() < deadline, "the request went on after its client left"
        time.sleep(0.05)
    stack.wait_idle()
    assert not stack.scheduler.has_unfinished()
