"""Structured output for SamplingParams.structured_output: what the generated text must match.

    SamplingParams(structured_output=StructuredOutput.json_schema({"type": "object", ...}))
    StructuredOutput.regex(r"\\d{3}-\\d{4}"), .grammar('root ::= "yes" | "no"'), .choice(["red", "blue"]),
    .json_object()  # any JSON object

docs/structured_output.md says what each accepts; a schema, regex or grammar the server cannot
compile fails the call with InvalidArgumentError carrying the compiler's message.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from proto.nanoplane.v1 import generation_pb2
from proto.sampling_schema import OPTION

KINDS = OPTION["structured_output"].members  # the oneof's fields in generation.proto


@dataclass(frozen=True)
class StructuredOutput:
    kind: str  # one of KINDS
    value: Any = None  # schema text, regex, grammar, or the tuple of choices

    @classmethod
    def json_schema(cls, schema: dict | str) -> "StructuredOutput":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> "StructuredOutput":
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> "StructuredOutput":
        """An EBNF (GBNF) grammar whose start rule is `root`."""
        return cls("grammar", ebnf)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> "StructuredOutput":
        return cls("choice", tuple(choices))

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        return cls("json_object", True)

    def fill(self, pb: generation_pb2.SamplingParams) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}; use one of {KINDS}")
        if self.kind == "choice":
            pb.choice.choices.extend(self.value)
        else:
            setattr(pb, self.kind, self.value)
