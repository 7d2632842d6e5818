"""The step plan/result codec: packed little-endian arrays survive protobuf unchanged, and bad plans are refused."""
import numpy as np
import pytest

from proto.nanoplane.v1 import dataplane_pb2
from proto.step import (PLAN_ARRAYS, RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan, StepResult, decode_plan,
                        decode_result, encode_plan, encode_result)


def sample_plan() -> StepPlan:
    return StepPlan(
        step_id=7,
        drop_slots=np.array([3], np.int32),
        new_slots=np.array([0, 5], np.int32),
        new_num_cached_tokens=np.array([0, 32], np.int32),
        new_temperature=np.array([0.0, 0.7], np.float32),
        new_top_p=np.array([1.0, 0.9], np.float32),
        new_top_k=np.array([-1, 40], np.int32),
        new_seed=np.array([0, 2**62], np.int64),
        new_has_seed=np.array([0, 1], np.uint8),
        block_slots=np.array([0, 0, 5], np.int32),
        block_indices=np.array([0, 1, 2], np.int32),
        block_ids=np.array([11, 12, 13], np.int32),
        run_slots=np.array([1, 0, 5], np.int32),
        run_num_tokens=np.array([1, 20, 4], np.int32),
        run_flags=np.array([RUN_SAMPLE, RUN_SAMPLE | RUN_TOKENS_IN_PLAN, RUN_TOKENS_IN_PLAN], np.uint8),
        token_ids=np.arange(24, dtype=np.int32),
    )


def test_plan_round_trips_through_protobuf_bytes():
    plan = sample_plan()
    wire = encode_plan(plan, dataplane_pb2.StepPlan).SerializeToString()
    back = decode_plan(dataplane_pb2.StepPlan.FromString(wire))
    assert back.step_id == 7
    for name, dtype in PLAN_ARRAYS.items():
        assert getattr(back, name).dtype == dtype
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name), err_msg=name)
    assert back.num_sampled == 2


def test_decode_step_plan_is_small():
    n = 256
    plan = StepPlan(step_id=1, run_slots=np.arange(n, dtype=np.int32), run_num_tokens=np.ones(n, np.int32),
                    run_flags=np.full(n, RUN_SAMPLE, np.uint8))
    wire = encode_plan(plan, dataplane_pb2.StepPlan).SerializeToString()
    assert len(wire) < n * 4 + n * 4 + n + 64  # slots, counts and flags: no token ids, no block tables


def test_result_round_trip():
    result = StepResult(step_id=3, slots=np.array([1, 4], np.int32), token_ids=np.array([99, 100], np.int32))
    back = decode_result(dataplane_pb2.StepResult.FromString(
        encode_result(result, dataplane_pb2.StepResult).SerializeToString()))
    np.testing.assert_array_equal(back.token_ids, [99, 100])


@pytest.mark.parametrize("breakage, message", [
    (lambda p: setattr(p, "token_ids", p.token_ids[:-1]), "token ids"),
    (lambda p: setattr(p, "new_top_p", p.new_top_p[:1]), "new_top_p"),
    (lambda p: setattr(p, "block_ids", p.block_ids[:1]), "differ in length"),
    (lambda p: (setattr(p, "run_flags", np.array([0, 0, 0], np.uint8)),
                setattr(p, "token_ids", np.zeros(0, np.int32))), "exactly 1 token"),
])
def test_inconsistent_plans_are_refused(breakage, message):
    plan = sample_plan()
    breakage(plan)
    with pytest.raises(ValueError, match=message):
        decode_plan(encode_plan(plan, dataplane_pb2.StepPlan))


def test_truncated_array_bytes_are_refused():
    pb = encode_plan(sample_plan(), dataplane_pb2.StepPlan)
    pb.run_slots = pb.run_slots[:-1]
    with pytest.raises(ValueError, match="run_slots"):
        decode_plan(pb)
