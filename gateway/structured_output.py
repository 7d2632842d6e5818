"""OpenAI's response_format and vLLM's guided_* fields, as the client's StructuredOutput.

- response_format {"type": "json_object"}: any JSON object;
- response_format {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}: that schema;
- guided_json (a schema, object or text), guided_regex, guided_choice (strings), guided_grammar (EBNF),
  as vLLM's OpenAI server takes them.
At most one of them; the server compiles it, and its refusal comes back as a 400.
"""
from __future__ import annotations

import json

from client import StructuredOutput

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class StructuredOutputError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _response_format(value) -> StructuredOutput | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise StructuredOutputError("response_format", 'must be an object with a "type"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_object()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise StructuredOutputError("response_format", 'json_schema needs {"name": ..., "schema": {...}}')
        return StructuredOutput.json_schema(spec["schema"])
    raise StructuredOutputError("response_format", f'type must be "text", "json_object" or "json_schema", got {kind!r}')


def _guided(name: str, value) -> StructuredOutput:
    if name == "guided_json":
        if isinstance(value, str):
            return StructuredOutput.json_schema(value)
        if isinstance(value, dict):
            return StructuredOutput.json_schema(json.dumps(value))
        raise StructuredOutputError(name, "must be a JSON schema (an object or its JSON text)")
    if name == "guided_choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise StructuredOutputError(name, "must be a list of strings")
        return StructuredOutput.choice(value)
    if not isinstance(value, str):
        raise StructuredOutputError(name, "must be a string")
    return StructuredOutput.regex(value) if name == "guided_regex" else StructuredOutput.grammar(value)


def structured_output_of(body: dict) -> StructuredOutput | None:
    given = [n for n in ("response_format", *GUIDED) if body.get(n) is not None]
    if len(given) > 1:
        raise StructuredOutputError(given[1], f"give one of response_format and {', '.join(GUIDED)}, "
                                              f"got {' and '.join(given)}")
    if not given:
        return None
    name = given[0]
    return _response_format(body[name]) if name == "response_format" else _guided(name, body[name])
