"""Structured output through both planes on a tiny random model: the grammar's mask alone makes the
output valid (random weights would write anything), for a JSON schema, a regex, a choice, an EBNF
grammar and json_object, greedy and sampled, with n > 1; invalid constraints fail before any token."""
import json
import re

import grpc
import jsonschema
import pytest

from client import InvalidArgumentError, SamplingParams, StructuredOutput
from tests.stack import InProcessStack

# finite on purpose: enums, bounded integers, booleans and bounded strings, so that a random model
# reaches the end of the grammar well within max_tokens
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ada", "alan", "grace"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "maxItems": 2},
    },
    "required": ["name", "age", "admin", "tags"],
}


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    import asyncio

    from gateway.config import GatewayConfig
    from gateway.http_gateway import start_http_gateway

    s = InProcessStack(str(tiny_model_dir("llama")), block_size=16, num_kv_blocks=128, max_num_batched_tokens=64)
    s.gateway = asyncio.run_coroutine_threadsafe(start_http_gateway(GatewayConfig(s.target, http_port=0)),
                                                 s.loop).result(30)
    yield s
    asyncio.run_coroutine_threadsafe(s.gateway.stop(), s.loop).result(30)
    s.close()


def test_json_schema_output_validates_greedy_and_sampled(stack):
    for params in (SamplingParams(temperature=0, max_tokens=96),
                   SamplingParams(temperature=1.0, seed=3, max_tokens=96, n=3)):
        params.structured_output = StructuredOutput.json_schema(PERSON)
        results = stack.client.generate_n("Who?", params) if params.n else [stack.client.generate("Who?", params)]
        for r in results:
            assert r.finish_reason == "stop", r
            jsonschema.validate(json.loads(r.text), PERSON)
    stack.wait_idle()
    assert stack.scheduler.num_constrained == 0


def test_regex_choice_grammar_and_json_object(stack):
    def run(constraint, **kw):
        r = stack.client.generate("Say", SamplingParams(temperature=0.8, seed=7, max_tokens=48,
                                                        structured_output=constraint, **kw))
        assert r.finish_reason == "stop", r
        return r.text

    assert re.fullmatch(r"[a-c]{2,4}-\d{3}", run(StructuredOutput.regex(r"[a-c]{2,4}-\d{3}")))
    assert run(StructuredOutput.choice(["red", "green", "blue \"sky\""])) in ("red", "green", "blue \"sky\"")
    assert run(StructuredOutput.grammar('root ::= "(" ("yes" | "no") ")"'), ignore_eos=True) in ("(yes)", "(no)")
    # any object: a random model may nest for ever, so only a finished one is checked
    r = stack.client.generate("Say", SamplingParams(temperature=0, max_tokens=64,
                                                    structured_output=StructuredOutput.json_object()))
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict)
    else:
        assert r.text.startswith("{")


def test_constrained_and_free_requests_share_the_batch(stack):
    """Unconstrained rows are never held back by constrained ones (the mask waits for its own token only)."""
    from concurrent.futures import ThreadPoolExecutor

    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=96, structured_output=StructuredOutput.json_schema(PERSON))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stack.client.generate, "Hi", p) for p in (free, constrained, free, constrained)]
        results = [f.result() for f in futures]
    assert [len(r.token_ids) for r in results[::2]] == [40, 40]
    for r in results[1::2]:
        jsonschema.validate(json.loads(r.text), PERSON)
    alone = stack.client.generate("Hi", free)
    assert alone.token_ids == results[0].token_ids  # greedy: the mask of other rows changes nothing here


@pytest.mark.parametrize("constraint, message", [
    (StructuredOutput.json_schema('{"type": "objec"}'), "sampling.json_schema: Unsupported type"),
    (StructuredOutput.json_schema('{"type": '), "sampling.json_schema: not valid JSON"),
    (StructuredOutput.regex("a(b"), "sampling.regex: Regex parsing error"),
    (StructuredOutput.grammar('root ::= "a" |'), "sampling.grammar:"),
    (StructuredOutput.choice([]), "sampling.choice: give 1 to"),
])
def test_invalid_constraints_are_invalid_argument(stack, constraint, message):
    with pytest.raises(InvalidArgumentError) as e:
        stack.client.generate("x", SamplingParams(max_tokens=4, structured_output=constraint))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(e.value), str(e.value)


def test_min_tokens_with_a_constraint_is_refused(stack):
    with pytest.raises(InvalidArgumentError, match="sampling.min_tokens: cannot be combined with structured output"):
        stack.client.generate("x", SamplingParams(max_tokens=8, min_tokens=2,
                                                  structured_output=StructuredOutput.regex("a+")))


def test_compiled_grammars_are_cached_by_text(tiny_model_dir):
    from controlplane.serving.tokenizer import load_tokenizer
    from controlplane.structured.compiler import StructuredOutputCompiler
    from controlplane.structured.spec import StructuredOutputSpec

    compiler = StructuredOutputCompiler.for_tokenizer(load_tokenizer(tiny_model_dir("llama")), 49152, [2])
    first = compiler.compile(StructuredOutputSpec("regex", "[0-9]+"))
    assert compiler.compile(StructuredOutputSpec("regex", "[0-9]+")) is first
    assert compiler.compile(StructuredOutputSpec("regex", "[0-9]*")) is not first
    assert (compiler.num_compiled, compiler.num_cache_hits) == (2, 1)


@pytest.mark.parametrize("body, kind", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}, "json_schema"),
    ({"guided_json": PERSON}, "json_schema"),
    ({"guided_regex": "a+"}, "regex"),
    ({"guided_choice": ["a", "b"]}, "choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar"),
])
def test_gateway_maps_response_format_and_guided_fields(body, kind):
    from gateway.openai_protocol import parse_chat_request

    job = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body})
    got = job.params.structured_output
    assert (got.kind if got else None) == kind


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_choice": "a"}, "guided_choice"),
    ({"guided_regex": "a", "guided_json": {}}, "guided_regex"),
])
def test_gateway_refuses_malformed_structured_output(body, param):
    from gateway.openai_protocol import OpenAIError, parse_chat_request

    with pytest.raises(OpenAIError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body})
    assert e.value.status == 400 and e.value.param == param


def test_openai_client_gets_schema_valid_json(stack):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.gateway.port}/v1", api_key="x", max_retries=0, timeout=60)
    model = oai.models.list().data[0].id
    out = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A person?"}], max_tokens=96, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                    extra_body={"guided_regex": "a(b"})
    assert "Regex parsing error" in str(e.value)
