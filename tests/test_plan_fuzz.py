"""Malformed step plans against the data plane: every one is rejected as INVALID_ARGUMENT, none crashes it.

A property test (hypothesis, derandomized) builds DataPlane StepPlan messages field by field: arrays of
each field's dtype with edge values (negative, zero, past every bound, NaN, ±inf) and lengths that agree
or disagree, or raw bytes that are no whole array. Each goes through the wire codec and the runner as a
Step stream does: the only exception allowed is ValueError (PlanError is one), which the data plane turns
into INVALID_ARGUMENT; anything else would reach the control plane as UNKNOWN. A few are then sent over a
real Step stream to see the status.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.link.dataplane_client import read_token
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from dataplane.server import build_server
from proto.dataplane_access import metadata
from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.step import PLAN_ARRAYS, decode_plan
from tests.tiny_models import save_tiny_model

OPTIONS = dict(dtype="float32", block_size=16, num_kv_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
               max_model_len=64, num_threads=1)
VOCAB = 128
INTS = [-2**31, -1, 0, 1, 2, 3, 4, 7, 15, 16, 63, 64, 65, VOCAB - 1, VOCAB, 2**31 - 1]
FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 0.5, 1.0, 2.0, 3.4e38, -3.4e38]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model = save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-fuzz"), vocab_size=VOCAB, seed=0)
    return ModelRunner(DataPlaneConfig(model=str(model), device="cpu", **OPTIONS))


def _values(dtype: np.dtype):
    if dtype.kind == "f":
        return st.sampled_from(FLOATS)
    if dtype == np.uint8:
        return st.integers(0, 255)
    if dtype.itemsize == 8:
        return st.sampled_from(INTS + [-2**63, 2**63 - 1])
    return st.sampled_from(INTS)


def _valid_plan() -> dict[str, np.ndarray]:
    """Two new sequences of 4 prompt tokens in blocks 0 and 1, both prefilled and sampled."""
    new = {name: np.zeros(2, dtype) for name, dtype in PLAN_ARRAYS.items() if name.startswith("new_")}
    new |= {"new_slots": np.array([0, 1], np.int32), "new_top_p": np.ones(2, np.float32),
            "new_top_k": np.full(2, -1, np.int32), "new_repetition_penalty": np.ones(2, np.float32),
            "new_num_prompt_tokens": np.full(2, 4, np.int32), "new_num_logprobs": np.full(2, -1, np.int32),
            "new_num_prompt_logprobs": np.full(2, -1, np.int32)}
    rest = {name: np.zeros(0, dtype) for name, dtype in PLAN_ARRAYS.items() if not name.startswith("new_")}
    return rest | new | {
        "block_slots": np.array([0, 1], np.int32), "block_indices": np.zeros(2, np.int32),
        "block_ids": np.array([0, 1], np.int32), "run_slots": np.array([0, 1], np.int32),
        "run_num_tokens": np.full(2, 4, np.int32), "run_flags": np.full(2, 3, np.uint8),
        "token_ids": np.arange(8, dtype=np.int32)}


@st.composite
def plans(draw) -> dataplane_pb2.StepPlan:
    """A valid plan with one to three fields spoiled: edge values at the same length, another length, or raw bytes
    that are no whole array; sometimes all fields at random."""
    fields = _valid_plan()
    spoiled = draw(st.lists(st.sampled_from(sorted(PLAN_ARRAYS)), min_size=1, max_size=3, unique=True))
    if draw(st.integers(0, 9)) == 0:
        spoiled = sorted(PLAN_ARRAYS)
    raw = {}
    for name in spoiled:
        dtype = PLAN_ARRAYS[name]
        kind = draw(st.sampled_from(["values", "values", "length", "raw bytes"]))
        if kind == "raw bytes":
            raw[name] = draw(st.binary(max_size=11))
            continue
        n = len(fields[name]) if kind == "values" else draw(st.integers(0, 5))
        fields[name] = np.array(draw(st.lists(_values(dtype), min_size=n, max_size=n)), dtype=dtype)
    encoded = {name: value.tobytes() for name, value in fields.items()} | raw
    return dataplane_pb2.StepPlan(step_id=draw(st.integers(0, 2**64 - 1)), **encoded)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(pb=plans())
def test_malformed_plans_are_rejected_not_crashing(runner, pb):
    runner.reset()
    try:
        runner.execute(decode_plan(pb))
    except ValueError:
        pass  # INVALID_ARGUMENT: the session ends here, as on a Step stream
    runner.reset()
    runner.execute(decode_plan(dataplane_pb2.StepPlan(step_id=0, **{k: v.tobytes() for k, v in _valid_plan().items()})))


@pytest.mark.parametrize("field, value", [("new_num_cached_tokens", -5), ("new_top_k", -7),
                                          ("new_temperature", float("nan")), ("new_num_prompt_tokens", -1)])
def test_one_bad_field_over_a_step_stream_is_invalid_argument(runner, field, value):
    """Issue 15: a negative new_num_cached_tokens got UNKNOWN (an unhandled numpy error)."""
    runner.reset()
    server, port, _ = build_server(runner, "127.0.0.1", 0, shm_socket="off")
    server.start()
    try:
        new = {name: np.zeros(1, dtype) for name, dtype in PLAN_ARRAYS.items() if name.startswith("new_")}
        new |= {"new_top_p": np.ones(1, np.float32), "new_top_k": np.full(1, -1, np.int32),
                "new_repetition_penalty": np.ones(1, np.float32), "new_num_prompt_tokens": np.full(1, 4, np.int32),
                "new_num_logprobs": np.full(1, -1, np.int32), "new_num_prompt_logprobs": np.full(1, -1, np.int32)}
        new[field] = np.full(1, value, PLAN_ARRAYS[field])
        pb = dataplane_pb2.StepPlan(
            step_id=0, **{k: v.tobytes() for k, v in new.items()},
            block_slots=np.zeros(1, np.int32).tobytes(), block_indices=np.zeros(1, np.int32).tobytes(),
            block_ids=np.zeros(1, np.int32).tobytes(), run_slots=np.zeros(1, np.int32).tobytes(),
            run_num_tokens=np.full(1, 4, np.int32).tobytes(), run_flags=np.full(1, 3, np.uint8).tobytes(),
            token_ids=np.arange(4, dtype=np.int32).tobytes())
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as channel:
            stream = dataplane_pb2_grpc.DataPlaneStub(channel).Step(iter([pb]), timeout=30,
                                                                  metadata=metadata(read_token("auto", target)))
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert field in caught.value.details()
    finally:
        server.stop(0)
