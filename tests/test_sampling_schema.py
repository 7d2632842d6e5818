"""The sampling table (proto/sampling_schema.py) against the wire contract (the .proto files) and what derives
from it: validation, SamplingOptions, the step plan's columns, the data plane's slot arrays, the client."""
from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from client import SamplingParams
from controlplane.core.sequence import SamplingOptions
from controlplane.serving.validation import InvalidRequest, RequestLimits, sampling_options
from proto.nanoplane.v1 import dataplane_pb2, generation_pb2
from proto.sampling_schema import COLUMNS, OPTION, OPTIONS, PENALTY_OPTIONS, uses_penalties
from proto.step import PLAN_ARRAYS, StepPlan

WIRE_OF_TYPE = {FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_INT32: "int32",
                FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_BOOL: "bool",
                FieldDescriptor.TYPE_STRING: "string"}
LIMITS = RequestLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=1024, max_logprobs=5, max_n=4)


def _oneof_of(f) -> str | None:
    """The oneof f is a member of, not counting the synthetic one of a proto3 `optional` field."""
    oneof = f.containing_oneof
    return oneof.name if oneof is not None and oneof.name != "_" + f.name else None


def test_the_table_is_generation_proto_sampling_params():
    proto_fields = sorted(generation_pb2.SamplingParams.DESCRIPTOR.fields, key=lambda f: f.number)
    names = [_oneof_of(f) or f.name for f in proto_fields]
    assert list(dict.fromkeys(names)) == [o.name for o in OPTIONS]  # a oneof's members: one row
    for f in proto_fields:
        if oneof := _oneof_of(f):
            assert OPTION[oneof].wire == "oneof" and f.name in OPTION[oneof].members, f.name
            continue
        option = OPTION[f.name]
        assert WIRE_OF_TYPE[f.type] == option.wire, f.name
        assert f.is_repeated == option.repeated, f.name
        assert f.has_presence == option.optional, f"{f.name}: optional in the .proto iff optional in the table"
    for option in OPTIONS:
        if option.wire == "oneof":
            assert [f.name for f in proto_fields if _oneof_of(f) == option.name] == list(option.members)


def test_the_columns_are_dataplane_proto_step_plan_fields():
    step_plan = dataplane_pb2.StepPlan.DESCRIPTOR.fields_by_name
    for column in COLUMNS:
        assert column.field in step_plan and step_plan[column.field].type == FieldDescriptor.TYPE_BYTES
        assert PLAN_ARRAYS[column.field] == np.dtype(column.dtype)
    # every per-new-sequence field of the wire is either a column or sequence state the plan builder sends
    new_fields = {name for name in step_plan if name.startswith("new_")}
    assert new_fields - {c.field for c in COLUMNS} == {"new_slots", "new_num_cached_tokens", "new_num_prompt_tokens",
                                                       "new_num_stop_ids"}


def test_derived_dataclasses_follow_the_table():
    assert [f.name for f in fields(SamplingParams)] == [o.name for o in OPTIONS]
    assert {f.name for f in fields(SamplingOptions)} == {o.name for o in OPTIONS}
    defaults = SamplingOptions(max_tokens=1)
    assert all(getattr(defaults, o.name) == o.default for o in OPTIONS if o.name != "max_tokens")
    unset = SamplingParams()
    assert all(getattr(unset, o.name) is None for o in OPTIONS if o.optional)
    assert unset.to_proto() == generation_pb2.SamplingParams()


def test_uses_penalties_on_scalars_and_columns():
    assert PENALTY_OPTIONS and not SamplingOptions(max_tokens=1).uses_penalties
    for option in PENALTY_OPTIONS:
        assert SamplingOptions(max_tokens=1, **{option.name: 1.5}).uses_penalties, option.name
    plan = StepPlan(step_id=0, new_slots=np.arange(2, dtype=np.int32),
                    **{f"new_{o.name}": np.array([o.default, 1.5], np.float32) for o in PENALTY_OPTIONS})
    assert plan.new_uses_penalties.tolist() == [False, True]
    assert uses_penalties({o.name: o.default for o in PENALTY_OPTIONS}.get) is False


def _outside(option) -> list:
    """Values the table's limits reject: below the low limit, and above a named high one."""
    if option.wire == "float":
        return [math.nan, option.low - 1 if option.low > -math.inf else math.inf]
    values = [option.low - 1]
    if isinstance(option.high, str):  # a server limit, or max_tokens (8 below)
        values.append(getattr(LIMITS, option.high, 8) + 1)
    assert option.off not in values
    return values


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.error], ids=lambda o: o.name)
def test_validation_rejects_with_the_tables_error(option):
    for value in _outside(option):
        pb = generation_pb2.SamplingParams(max_tokens=8)
        setattr(pb, option.name, value)
        with pytest.raises(InvalidRequest) as caught:
            sampling_options(pb, 4, LIMITS)
        assert caught.value.field == f"sampling.{option.name}"
        assert str(caught.value).endswith(f"got {getattr(pb, option.name)}")


def test_validation_fills_the_tables_defaults():
    options = sampling_options(generation_pb2.SamplingParams(), 4, LIMITS)
    assert options.max_tokens == 60  # the room the model length leaves
    assert all(getattr(options, o.name) == o.default for o in OPTIONS if o.name != "max_tokens")
