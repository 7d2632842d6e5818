"""dataplane/step_loop.py: a plan that arrives while a step runs is launched before that step is answered."""
from __future__ import annotations

from dataplane.step_loop import END, run_steps
from proto.step import StepPlan, StepResult


class SlowStep:
    """A launched step whose outputs reach the host after `polls` calls of ready()."""

    def __init__(self, step_id: int, polls: int, events: list):
        self.step_id, self.polls, self.events = step_id, polls, events

    def ready(self) -> bool:
        self.polls -= 1
        return self.polls <= 0

    def result(self) -> StepResult:
        self.events.append(("result", self.step_id))
        return StepResult(step_id=self.step_id)


class Runner:
    def __init__(self, polls: int):
        self.polls, self.events = polls, []

    def launch(self, plan: StepPlan) -> SlowStep:
        self.events.append(("launch", plan.step_id))
        return SlowStep(plan.step_id, self.polls, self.events)


class TrickleSource:
    """Plan i is there from the (arrival[i])-th non-blocking call on, as a control plane that sends
    plan N+1 only after it has read result N - 1 would deliver them."""

    def __init__(self, arrivals: list[int]):
        self.arrivals, self.calls, self.next_id = arrivals, 0, 0

    def next_plan(self, block: bool):
        self.calls += 1
        if self.next_id == len(self.arrivals):
            return END
        if block or self.calls >= self.arrivals[self.next_id]:
            self.next_id += 1
            return StepPlan(step_id=self.next_id - 1)
        return None


def test_a_plan_arriving_while_a_step_runs_is_launched_before_that_step_is_answered():
    runner = Runner(polls=50)
    source = TrickleSource([0, 0, 10, 30, 60])
    results = [r.step_id for r in run_steps(runner, source)]
    assert results == [0, 1, 2, 3, 4]
    launches = [step for kind, step in runner.events if kind == "launch"]
    assert launches == [0, 1, 2, 3, 4]
    # step n + 1 was launched before step n's result was read: never more than two in flight
    for n in range(4):
        assert runner.events.index(("launch", n + 1)) < runner.events.index(("result", n))
    for n in range(2, 5):
        assert runner.events.index(("result", n - 2)) < runner.events.index(("launch", n))


def test_a_step_whose_outputs_are_ready_is_answered_without_waiting_for_a_plan():
    runner = Runner(polls=1)
    source = TrickleSource([0, 1000])
    results = run_steps(runner, source)
    assert next(results).step_id == 0
    assert ("launch", 1) not in runner.events  # answered while plan 1 had not arrived
    assert [r.step_id for r in results] == [1]
