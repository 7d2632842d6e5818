"""The data plane's step loop, the same for every transport: plans in, results out, two steps in flight.

`run_steps(runner, source)` yields one StepResult per plan, in plan order. The gRPC Step
handler (dataplane/server.py) and a shared-memory session (dataplane/shm_server.py) each
wrap their receiving end in a PlanSource and send what it yields.

Pipelining: a plan that arrives while the step before it still runs on the device is
launched at once, before that step's result is waited for, so the device never idles
between them (at most MAX_IN_FLIGHT steps launched and not yet answered). The control
plane sends plan N+1 before it reads result N, and N+2 while N+1 runs: so while a step
runs, the loop polls for the next plan as well as for the step's outputs (PendingStep.ready),
rather than blocking on the outputs and launching N+2 only after N+1 has finished, which
would leave the device idle for a whole launch per step. A runner without
`launch(plan) -> PendingStep`, or one whose `launch_returns_early` is False (the CPU: the
step has run by the time launch returns), gets one step at a time: launching the plan
that is already waiting before answering the finished step would only hold its result back
a whole step, and polling for it costs the cores the step needs.

A plan the runner or the codec rejects (PlanError, ValueError) ends the session with
PlanRejected, after the steps still in flight have drained; the transport reports it
to the control plane, and its caller resets the runner.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Iterator, Protocol

import structlog

from dataplane.batch_state import PlanError
from dataplane.sessions import SessionFenced
from proto.step import StepPlan, StepResult

log = structlog.get_logger("dataplane.step_loop")

MAX_IN_FLIGHT = 2
POLL_S = 20e-6  # between polls for the next plan while a step runs (Linux sleeps ~60-80 µs at least)
END = object()  # what a PlanSource returns when the control plane ended the session
_WAKE = object()


class PlanRejected(Exception):
    def __init__(self, step_id: int, reason: str):
        super().__init__(f"step plan {step_id} rejected: {reason}")
        self.step_id = step_id


class PlanSource(Protocol):
    def next_plan(self, block: bool) -> StepPlan | object | None:
        """The next plan; END when the session is over; None when block is False and none has arrived.
        Raises PlanRejected for a message that does not decode to a consistent plan, SessionFenced once a
        newer session fenced this one (dataplane/sessions.py)."""


class _Done:
    """The PendingStep of a runner that has no launch(): the step already ran."""

    __slots__ = ("_result",)

    def __init__(self, result: StepResult):
        self._result = result

    def ready(self) -> bool:
        return True

    def result(self) -> StepResult:
        return self._result


def _launch(runner, plan: StepPlan):
    # joined with the control plane's "sequence entered slot" lines by step_id and slot
    if len(plan.new_slots) or len(plan.drop_slots):
        log.info("batch changed", step_id=plan.step_id, new_slots=plan.new_slots.tolist(),
                 drop_slots=plan.drop_slots.tolist())
    try:
        launch = getattr(runner, "launch", None)
        return launch(plan) if launch is not None else _Done(runner.execute(plan))
    except (PlanError, ValueError) as e:
        raise PlanRejected(plan.step_id, str(e)) from e


def _result(plan: StepPlan, pending) -> StepResult:
    try:
        result = pending.result()
    except (PlanError, ValueError) as e:
        raise PlanRejected(plan.step_id, str(e)) from e
    if result.step_id != plan.step_id:
        raise RuntimeError(f"the runner answered plan {plan.step_id} with the result of step {result.step_id}")
    return result


def pipelines(runner) -> bool:
    """Whether a step is launched while the one before it still runs: only where launch() returns before the
    step is done (a GPU). On a CPU the step ran inside launch(), so there is nothing to overlap it with."""
    return hasattr(runner, "launch") and getattr(runner, "launch_returns_early", True)


def run_steps(runner, source: PlanSource) -> Iterator[StepResult]:
    depth = MAX_IN_FLIGHT if pipelines(runner) else 1
    in_flight: deque = deque()
    ended = False
    try:
        while True:
            if not in_flight:
                plan = END if ended else source.next_plan(block=True)
                if plan is END:
                    return
                in_flight.append((plan, _launch(runner, plan)))
            while not ended and len(in_flight) < depth:
                plan = _next_plan_before_ready(source, in_flight[0][1])
                if plan is None:
                    break  # the oldest step's outputs are on the host: answer it first
                if plan is END:
                    ended = True
                else:
                    in_flight.append((plan, _launch(runner, plan)))
            yield _result(*in_flight.popleft())
    except PlanRejected as e:
        log.error("rejected step plan", step_id=e.step_id, error=str(e))
        _drain(in_flight)
        raise
    except SessionFenced:
        _drain(in_flight)
        raise
    finally:
        _drain(in_flight)  # a transport that stopped taking results (peer gone) leaves steps in flight


def _next_plan_before_ready(source: PlanSource, pending):
    """The next plan if one arrives before pending's outputs are ready (or END); None once they are."""
    ready = getattr(pending, "ready", None)
    while True:
        plan = source.next_plan(block=False)
        if plan is not None:
            return plan
        if ready is None or ready():
            return None
        time.sleep(POLL_S)


def _drain(in_flight: deque) -> None:
    """Waits out the steps still in flight, so that resetting the runner after cannot race them."""
    while in_flight:
        plan, pending = in_flight.popleft()
        try:
            pending.result()
        except Exception as e:  # the session is ending anyway
            log.info("step in flight failed while the session ended", step_id=plan.step_id, error=str(e))


class QueuedPlanSource:
    """A PlanSource over a blocking iterator of plans (the gRPC request stream), read on its own thread.

    decode(message) -> StepPlan raises ValueError on a bad message; step_id_of(message) names it."""

    def __init__(self, messages, decode, step_id_of):
        self._queue: queue.Queue = queue.Queue()
        self._fenced = ""
        self._thread = threading.Thread(target=self._read, args=(messages, decode, step_id_of),
                                        name="plan-reader", daemon=True)
        self._thread.start()

    def _read(self, messages, decode, step_id_of) -> None:
        try:
            for message in messages:
                try:
                    self._queue.put(decode(message))
                except ValueError as e:
                    self._queue.put(PlanRejected(step_id_of(message), str(e)))
                    return
        except Exception as e:  # the stream was cancelled or broke: the session is over
            log.info("step stream ended", reason=type(e).__name__)
        finally:
            self._queue.put(END)

    def fence(self, message: str) -> None:
        self._fenced = message
        self._queue.put(_WAKE)

    def next_plan(self, block: bool):
        if self._fenced:
            raise SessionFenced(self._fenced)
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return None
        if item is _WAKE:
            raise SessionFenced(self._fenced)
        if isinstance(item, PlanRejected):
            raise item
        if item is END:
            self._queue.put(END)  # stays over for a later call
        return item
