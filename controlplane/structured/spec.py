"""What a request asks its output to match, as plain data (no xgrammar here: validation imports it)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from proto.sampling_schema import OPTION

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or grammar longer than this is refused
MAX_CHOICES = 1024

KINDS = OPTION["structured_output"].members  # the oneof's fields in generation.proto


class InvalidStructuredOutput(ValueError):
    """The constraint cannot be used: the message says why (the compiler's own words when it refused)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StructuredOutputUnavailable(RuntimeError):
    """This control plane cannot compile grammars (xgrammar is not installed): UNIMPLEMENTED."""


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    """kind is one of KINDS; text is the schema (JSON text), regex, EBNF grammar, or the choices
    as a JSON list; json_object has the empty text. (kind, text) is the compiled-grammar cache key."""

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidStructuredOutput("structured_output", f"unknown kind {self.kind!r}; use one of {KINDS}")

    @property
    def field(self) -> str:
        return f"sampling.{self.kind}"

    @classmethod
    def choice(cls, choices) -> "StructuredOutputSpec":
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @property
    def choices(self) -> list[str]:
        return json.loads(self.text) if self.kind == "choice" else []


def spec_from_proto(pb) -> StructuredOutputSpec | None:
    """The spec of a nanoplane.v1.SamplingParams' `structured_output` oneof, checked for size and shape
    (whether a schema, regex or grammar compiles is the compiler's to say)."""
    kind = pb.WhichOneof("structured_output")
    if kind is None or (kind == "json_object" and not pb.json_object):
        return None
    field = f"sampling.{kind}"
    if kind == "json_object":
        return StructuredOutputSpec("json_object")
    if kind == "choice":
        choices = list(pb.choice.choices)
        if not 1 <= len(choices) <= MAX_CHOICES:
            raise InvalidStructuredOutput(field, f"give 1 to {MAX_CHOICES} choices, got {len(choices)}")
        for i, c in enumerate(choices):
            if not c:
                raise InvalidStructuredOutput(f"{field}[{i}]", "a choice must not be empty")
        spec = StructuredOutputSpec.choice(choices)
    else:
        text = getattr(pb, kind)
        if not text.strip():
            raise InvalidStructuredOutput(field, f"the {kind.replace('_', ' ')} is empty")
        if kind == "json_schema":
            try:
                schema = json.loads(text)
            except ValueError as e:
                raise InvalidStructuredOutput(field, f"not valid JSON: {e}") from e
            if not isinstance(schema, (dict, bool)):
                raise InvalidStructuredOutput(field, "a JSON schema is an object (or true/false)")
        spec = StructuredOutputSpec(kind, text)
    if len(spec.text) > MAX_GRAMMAR_CHARS:
        raise InvalidStructuredOutput(field, f"at most {MAX_GRAMMAR_CHARS} characters, got {len(spec.text)}")
    return spec


def check_compatible(spec: StructuredOutputSpec, sampling) -> None:
    """Options that cannot be honoured with a grammar: refused rather than silently bent."""
    if sampling.min_tokens:
        # the grammar may allow only EOS while min_tokens bans it: no token would be left
        raise InvalidStructuredOutput("sampling.min_tokens", "cannot be combined with structured output; leave it 0")
