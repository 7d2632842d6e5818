"""The step plan/result codec: packed little-endian arrays survive protobuf unchanged, and bad plans are refused."""
import numpy as np
import pytest

from proto.nanoplane.v1 import dataplane_pb2
from proto.step import (PLAN_ARRAYS, RESULT_ARRAYS, RUN_PROMPT_LOGPROBS, RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan,
                        StepResult, decode_plan, decode_result, encode_plan, encode_result)


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
        run_flags=np.array([RUN_SAMPLE, RUN_SAMPLE | RUN_TOKENS_IN_PLAN, RUN_TOKENS_IN_PLAN | RUN_PROMPT_LOGPROBS],
                           np.uint8),
        token_ids=np.arange(24, dtype=np.int32),
        new_num_prompt_tokens=np.array([20, 30], np.int32),
        new_min_p=np.array([0.0, 0.05], np.float32),
        new_repetition_penalty=np.array([1.0, 1.2], np.float32),  # slot 5 has a penalty: its 32 cached tokens travel
        new_presence_penalty=np.array([0.0, -0.5], np.float32),
        new_frequency_penalty=np.array([0.0, 2.0], np.float32),
        new_min_tokens=np.array([0, 3], np.int32),
        new_num_logprobs=np.array([-1, 5], np.int32),
        new_num_prompt_logprobs=np.array([-1, 2], np.int32),
        new_num_stop_ids=np.array([0, 2], np.int32),
        stop_ids=np.array([2, 7], np.int32),
        cached_token_ids=np.arange(100, 132, dtype=np.int32),
        prompt_logprob_counts=np.array([4], np.int32),
        prompt_logprob_token_ids=np.array([21, 22, 23, 24], np.int32),
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


def sample_result() -> StepResult:
    return StepResult(step_id=3, slots=np.array([1, 4], np.int32), token_ids=np.array([99, 100], np.int32),
                      logprob_rows=np.array([1], np.int32), logprobs=np.array([-0.5], np.float32),
                      logprob_ranks=np.array([2], np.int32), top_token_ids=np.array([7, 100, 3], np.int32),
                      top_logprobs=np.array([-0.1, -0.5, -3.0], np.float32),
                      prompt_logprobs=np.array([-1.0, -2.0], np.float32), prompt_logprob_ranks=np.array([1, 9], np.int32),
                      prompt_top_token_ids=np.array([5, 6], np.int32), prompt_top_logprobs=np.array([-1.0, -0.2], np.float32))


def test_result_round_trip():
    result = sample_result()
    back = decode_result(dataplane_pb2.StepResult.FromString(
        encode_result(result, dataplane_pb2.StepResult).SerializeToString()))
    for name, dtype in RESULT_ARRAYS.items():
        assert getattr(back, name).dtype == dtype
        np.testing.assert_array_equal(getattr(back, name), getattr(result, name), err_msg=name)
    assert back.num_top_logprobs == 3 and back.num_top_prompt_logprobs == 1


@pytest.mark.parametrize("breakage", [
    lambda r: setattr(r, "token_ids", r.token_ids[:1]),
    lambda r: setattr(r, "logprob_ranks", r.logprob_ranks[:0]),
    lambda r: setattr(r, "top_logprobs", r.top_logprobs[:2]),
    lambda r: setattr(r, "logprob_rows", np.array([2], np.int32)),
    lambda r: setattr(r, "prompt_top_token_ids", r.prompt_top_token_ids[:1]),
])
def test_inconsistent_results_are_refused(breakage):
    result = sample_result()
    breakage(result)
    with pytest.raises(ValueError):
        decode_result(encode_result(result, dataplane_pb2.StepResult))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: setattr(p, "token_ids", p.token_ids[:-1]), "token ids"),
    (lambda p: setattr(p, "new_top_p", p.new_top_p[:1]), "new_top_p"),
    (lambda p: setattr(p, "block_ids", p.block_ids[:1]), "differ in length"),
    (lambda p: (setattr(p, "run_flags", np.array([0, 0, 0], np.uint8)),
                setattr(p, "token_ids", np.zeros(0, np.int32))), "exactly 1 token"),
    (lambda p: setattr(p, "new_min_p", p.new_min_p[:1]), "new_min_p"),
    (lambda p: setattr(p, "stop_ids", p.stop_ids[:1]), "stop_ids"),
    (lambda p: setattr(p, "cached_token_ids", p.cached_token_ids[:-1]), "cached_token_ids"),
    (lambda p: setattr(p, "prompt_logprob_counts", np.array([5], np.int32)), "prompt_logprob_counts"),
    (lambda p: setattr(p, "prompt_logprob_token_ids", p.prompt_logprob_token_ids[:3]), "prompt_logprob_token_ids"),
    (lambda p: setattr(p, "run_flags", p.run_flags & ~np.uint8(RUN_PROMPT_LOGPROBS)), "RUN_PROMPT_LOGPROBS"),
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
