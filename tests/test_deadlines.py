"""A client's deadline or cancel aborts the sequence on both planes within one step.

Control plane: the next plan the scheduler builds after the abort reaches the engine no
longer has the sequence (its KV blocks are back on the free list) and carries its slot in
drop_slots. Data plane: that slot is released in its persistent batch. A second, long
request keeps steps coming meanwhile, as in a busy server (with nothing else to run, the
drop rides on the next plan whenever it comes).
"""
import threading
import time

import grpc
import pytest

from client import SamplingParams
from proto.nanoplane.v1 import generation_pb2 as pb
from tests.stack import InProcessStack


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=96, max_num_seqs=4)
    yield s
    s.close()


class PlanTrace:
    """Spies on the engine thread's scheduler.schedule (the real one runs): per plan, which requests were still
    unfinished when it was built, its drop_slots, and each request's last slot; and when engine.abort was called."""

    def __init__(self, stack):
        self.stack = stack
        self.plans: list[tuple[set[str], list[int] | None]] = []
        self.slot_of: dict[str, int] = {}
        self.abort_at: dict[str, int] = {}  # request id -> plans built before its abort was asked for
        self._schedule, self._abort = stack.scheduler.schedule, stack.engine.abort
        stack.scheduler.schedule, stack.engine.abort = self.schedule, self.abort

    def schedule(self):
        alive = {s.request_id for s in self.stack.scheduler.seqs.values()}
        plan = self._schedule()
        for s in self.stack.scheduler.running:
            self.slot_of[s.request_id] = s.slot
        self.plans.append((alive, None if plan is None else plan.drop_slots.tolist()))
        return plan

    def abort(self, request_id: str) -> None:
        self.abort_at.setdefault(request_id, len(self.plans))
        self._abort(request_id)

    def close(self) -> None:
        del self.stack.scheduler.schedule, self.stack.engine.abort

    def plans_until_gone(self, request_id: str) -> int:
        """How many plans were built after the abort was asked for and before the sequence was gone."""
        asked = self.abort_at[request_id]
        gone = next(i for i in range(asked, len(self.plans)) if request_id not in self.plans[i][0])
        return gone - asked

    def dropped_in_first_plan_after(self, request_id: str) -> bool:
        asked = self.abort_at[request_id]
        gone = asked + self.plans_until_gone(request_id)
        first_plan = next(drops for _, drops in self.plans[gone:] if drops is not None)
        return self.slot_of[request_id] in first_plan


class Companion:
    """Long requests, one after another on a thread, so plans keep coming whatever the machine's speed."""

    def __init__(self, stack):
        self.stack = stack
        self._stop = threading.Event()
        self._call = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = pb.GenerateRequest(prompt="the companion", sampling=pb.SamplingParams(
            max_tokens=480, temperature=0, ignore_eos=True))
        while not self._stop.is_set():
            self._call = self.stack.client.stub.Generate(request, timeout=120)
            for _ in _quiet(self._call):
                self.started.set()

    def close(self) -> None:
        self._stop.set()
        self._call.cancel()
        self._thread.join(30)


@pytest.fixture
def busy(stack):
    """Steps kept coming by a companion, the trace, and the leak check after."""
    stack.wait_idle()
    start_free = stack.num_free_blocks()
    trace = PlanTrace(stack)
    companion = Companion(stack)
    assert companion.started.wait(30)
    yield trace
    companion.close()
    trace.close()
    stack.wait_idle()
    assert stack.num_free_blocks() == start_free
    stack.scheduler.check_invariants()


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def assert_released_on_both_planes(stack, trace: PlanTrace, request_id: str) -> None:
    wait_until(lambda: request_id in trace.abort_at and any(
        request_id not in alive for alive, _ in trace.plans[trace.abort_at[request_id]:]), "no abort arrived")
    assert trace.plans_until_gone(request_id) <= 1  # the plan being built as the abort arrived may still have it
    wait_until(lambda: any(d is not None for _, d in trace.plans[trace.abort_at[request_id] + 1:]), "no next plan")
    assert trace.dropped_in_first_plan_after(request_id)
    slot = trace.slot_of[request_id]
    def released() -> bool:  # or already given to another request: the drop came first in its plan
        occupant = stack.scheduler.seq_at_slot(slot)
        return not stack.runner.batch.active[slot] or (occupant is not None and occupant.request_id != request_id)

    wait_until(released, f"the data plane still holds slot {slot}")


def test_client_deadline_frees_blocks_and_slot_within_one_step(stack, busy):
    request = pb.GenerateRequest(prompt="a long story with a deadline", request_id="with-deadline",
                                 sampling=pb.SamplingParams(max_tokens=480, temperature=0, ignore_eos=True))
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for response in stack.client.stub.Generate(request, timeout=0.5):
            received.append(response)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received, "the deadline passed before the request ran: nothing to free"
    assert "with-deadline" in busy.slot_of
    assert_released_on_both_planes(stack, busy, "with-deadline")


def test_client_cancel_frees_blocks_and_slot_within_one_step(stack, busy):
    stream = stack.client.generate_stream("a long story to cancel", SamplingParams(max_tokens=480, temperature=0,
                                                                                   ignore_eos=True),
                                          request_id="cancelled")
    next(stream)
    next(stream)
    stream.close()  # cancels the call
    assert_released_on_both_planes(stack, busy, "cancelled")


def test_cancel_while_waiting_for_a_slot_leaves_the_queue_within_one_step(stack, busy):
    """Four slots: three long requests and the companion hold them; the fifth waits, then is cancelled."""
    holders = [stack.client.stub.Generate(pb.GenerateRequest(
        prompt=f"holder {i}", sampling=pb.SamplingParams(max_tokens=480, ignore_eos=True)), timeout=120)
        for i in range(3)]
    for h in holders:
        next(h)
    waiting = stack.client.stub.Generate(pb.GenerateRequest(
        prompt="waiting", request_id="waiting", sampling=pb.SamplingParams(max_tokens=8)), timeout=120)
    threading.Thread(target=lambda: list(_quiet(waiting)), daemon=True).start()
    def queued() -> bool:
        return any(s.request_id == "waiting" for s in list(stack.scheduler.waiting))

    wait_until(queued, "the fifth request did not queue")
    waiting.cancel()
    wait_until(lambda: "waiting" in busy.abort_at, "no abort")
    wait_until(lambda: not queued(), "still queued")
    assert busy.plans_until_gone("waiting") <= 1
    for h in holders:
        h.cancel()


def _quiet(call):
    try:
        yield from call
    except grpc.RpcError:
        return
