"""The sampling options, each declared once: type, default, limits and their error text, how it travels.

OPTIONS has one row per field of the public API's SamplingParams (generation.proto), in
field-number order. Everything else that lists sampling options derives from it:
- the control plane's checks (controlplane/serving/validation.py: `check_value`, the rows' limits);
- `SamplingOptions`, the validated values a Sequence holds (controlplane/core/sequence.py);
- the step plan's per-new-sequence columns (`COLUMNS`: dataplane.proto's `new_*` fields,
  proto/step.py's PLAN_ARRAYS) that the plan builder packs and the data plane keeps in one
  per-slot array each (dataplane/sampling/sampling_params.py), and which of them the Sampler
  and the penalties read (`reads`);
- the client's SamplingParams (client/types.py) and the OpenAI body fields that map as they are
  (gateway/openai_protocol.py).
A row may stand for a oneof of generation.proto (`members`): `structured_output`, whose set
member says what the output must match; its value is read and checked by
controlplane/structured/spec.py and travels per step as the plan's grammar bitmask, not as a column.
The .proto files stay the wire contract: tests/test_sampling_schema.py checks that they and
this table agree. docs/sampling.md says what each option does and how to add one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Callable

INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


def _same(value):
    return value


def _count_or_off(value: int | None) -> int:
    return -1 if value is None else value


@dataclass(frozen=True, slots=True)
class Column:
    """One per-new-sequence array of the step plan, and the data plane's per-slot array of it."""

    field: str  # the StepPlan and dataplane.proto field
    dtype: str  # numpy dtype on the wire (little-endian)
    pack: Callable[[object], object] = _same  # the option's value -> the column's

    @property
    def slot(self) -> str:
        """The name of the data plane's per-slot array."""
        return self.field.removeprefix("new_")


@dataclass(frozen=True, slots=True)
class SamplingOption:
    name: str
    wire: str  # its type in generation.proto: float, int32, int64, bool or string (of each item when repeated);
    # oneof: a oneof of several fields (`members`), the option's value says which is set and to what
    default: object  # the value when the request leaves it unset; None: it stays unset
    optional: bool = True  # the proto field has presence: unset is not its zero value
    repeated: bool = False
    # limits, checked by the control plane: value == off, or low <= value <= high (low < value when
    # low_open); high may name a server limit (RequestLimits) or an option checked earlier
    low: float | int | None = None
    high: float | int | str | None = None
    low_open: bool = False
    off: int | None = None
    error: str = ""  # what the caller is told, formatted with value, low and high
    max_items: int = 0  # of a repeated option
    columns: tuple[Column, ...] = ()  # how it travels per step; () = only the control plane uses it
    reads: str = ""  # which data-plane part reads its columns per row: "sampler" or "penalties"
    openai: bool = False  # a scalar OpenAI (or vLLM extra) request field of the same name and meaning
    members: tuple[str, ...] = ()  # of a oneof: its fields in generation.proto, in field-number order


def _column(option: str, dtype: str) -> tuple[Column, ...]:
    return (Column(f"new_{option}", dtype),)


OPTIONS: tuple[SamplingOption, ...] = (
    SamplingOption("temperature", "float", 1.0, low=0.0, high=math.inf,
                   error="must be a finite number >= 0 (0 = greedy), got {value}",
                   columns=_column("temperature", "<f4"), reads="sampler", openai=True),
    SamplingOption("top_p", "float", 1.0, low=0.0, high=1.0, low_open=True, error="must be in (0, 1], got {value}",
                   columns=_column("top_p", "<f4"), reads="sampler", openai=True),
    SamplingOption("top_k", "int32", -1, low=1, high=INT32_MAX, off=-1,
                   error="must be -1 (disabled) or at least 1, got {value}",
                   columns=_column("top_k", "<i4"), reads="sampler", openai=True),
    # default: the room the model length and the KV cache leave after the prompt (validation.py)
    SamplingOption("max_tokens", "int32", None, low=1, error="must be at least 1, got {value}"),
    SamplingOption("stop", "string", (), optional=False, repeated=True, max_items=64),
    SamplingOption("stop_token_ids", "int32", (), optional=False, repeated=True, max_items=256),
    SamplingOption("ignore_eos", "bool", False, optional=False, openai=True),
    SamplingOption("seed", "int64", None, low=0, high=INT64_MAX, error="must be >= 0, got {value}",
                   columns=(Column("new_seed", "<i8", lambda seed: seed or 0),
                            Column("new_has_seed", "u1", lambda seed: seed is not None)),
                   reads="sampler", openai=True),
    SamplingOption("min_p", "float", 0.0, low=0.0, high=1.0, error="must be a finite number in [0, 1], got {value}",
                   columns=_column("min_p", "<f4"), reads="sampler", openai=True),
    SamplingOption("repetition_penalty", "float", 1.0, low=0.0, high=math.inf, low_open=True,
                   error="must be a finite number in (0, inf), got {value}",
                   columns=_column("repetition_penalty", "<f4"), reads="penalties", openai=True),
    SamplingOption("presence_penalty", "float", 0.0, low=-2.0, high=2.0,
                   error="must be a finite number in [-2, 2], got {value}",
                   columns=_column("presence_penalty", "<f4"), reads="penalties", openai=True),
    SamplingOption("frequency_penalty", "float", 0.0, low=-2.0, high=2.0,
                   error="must be a finite number in [-2, 2], got {value}",
                   columns=_column("frequency_penalty", "<f4"), reads="penalties", openai=True),
    SamplingOption("logprobs", "int32", None, low=0, high="max_logprobs",
                   error="must be {low} to {high} (the server's --max-logprobs), got {value}",
                   columns=(Column("new_num_logprobs", "<i4", _count_or_off),)),
    SamplingOption("prompt_logprobs", "int32", None, low=0, high="max_logprobs",
                   error="must be {low} to {high} (the server's --max-logprobs), got {value}",
                   columns=(Column("new_num_prompt_logprobs", "<i4", _count_or_off),)),
    SamplingOption("n", "int32", 1, low=1, high="max_n",
                   error="must be {low} to {high} (the server's --max-n), got {value}"),
    SamplingOption("min_tokens", "int32", 0, low=0, high="max_tokens",
                   error="must be {low} to {high} (at most max_tokens), got {value}",
                   columns=_column("min_tokens", "<i4"), openai=True),
    SamplingOption("skip_special_tokens", "bool", True, openai=True),
    SamplingOption("include_stop_str_in_output", "bool", False, optional=False, openai=True),
    # what the output must match (docs/structured_output.md); the gateway maps response_format and guided_* to it
    SamplingOption("structured_output", "oneof", None,
                   members=("json_schema", "regex", "grammar", "choice", "json_object")),
    # false: never speculated; true: when the server speculates and the other options allow it (docs/speculative.md)
    SamplingOption("speculative", "bool", True),
)
OPTION = {o.name: o for o in OPTIONS}
PYTHON_TYPE = {"float": float, "int32": int, "int64": int, "bool": bool, "string": str, "oneof": object}
WIRE_RANGE = {"int32": (-2**31, INT32_MAX), "int64": (-2**63, INT64_MAX)}
DATAPLANE_OPTIONS = tuple(o for o in OPTIONS if o.columns)
COLUMNS: tuple[Column, ...] = tuple(c for o in DATAPLANE_OPTIONS for c in o.columns)
PENALTY_OPTIONS = tuple(o for o in OPTIONS if o.reads == "penalties")


def column_values(option_values: list, column: Column) -> list:
    """The column's entries for a list of its option's values."""
    pack = column.pack
    return [pack(v) for v in option_values] if pack is not _same else option_values


def uses_penalties(value_of: Callable[[str], object]):
    """Whether some penalty is on: value_of(name) gives a penalty's value, or an array of them
    (then the answer is a bool array). The one place that says which values are "off"."""
    on = False
    for option in PENALTY_OPTIONS:
        on = on | (value_of(option.name) != option.default)
    return on


def check_value(option: SamplingOption, value, limit_of: Callable[[str], object]) -> str | None:
    """What is wrong with a set value of `option` (None: nothing); limit_of resolves a named high limit."""
    low, high = option.low, option.high
    if isinstance(high, str):
        high = limit_of(high)
    if option.off is not None and value == option.off:
        return None
    bad = option.wire == "float" and not math.isfinite(value)
    if not bad and low is not None:
        bad = value < low or (option.low_open and value == low)
    if not bad and high is not None:
        bad = value > high
    return option.error.format(value=value, low=low, high=high) if bad else None


def _hint(option: SamplingOption, default) -> str:
    kind = PYTHON_TYPE[option.wire].__name__
    kind = f"tuple[{kind}, ...]" if option.repeated else kind
    return f"{kind} | None" if default is None else kind


def options_dataclass(name: str, base: type, *, unset_is_none: bool, frozen: bool, first: tuple[str, ...] = ()) -> type:
    """A dataclass named `name`, with base's methods, docstring and module, and one field per option in
    table order, those in `first` leading without a default. unset_is_none: an optional option defaults
    to None (the server picks), the others to the table's default."""
    fields_ = [(n, _hint(OPTION[n], 0)) for n in first]
    for option in OPTIONS:
        if option.name not in first:
            default = None if unset_is_none and option.optional else option.default
            fields_.append((option.name, _hint(option, default), field(default=default)))
    return make_dataclass(name, fields_, bases=(base,), frozen=frozen, slots=True,
                          namespace={"__doc__": base.__doc__, "__module__": base.__module__,
                                     "__qualname__": name})
