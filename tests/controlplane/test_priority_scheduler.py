"""Priority scheduling in the Scheduler: order offsets (Engine: priority × --priority-aging-requests) decide
admission and preemption, against the KV oracle."""
from controlplane.core.sequence import SamplingOptions, Sequence, SequenceStatus
from tests.controlplane.test_scheduler import make, run_all

AGING = 100


def add(sched, seq_id, priority, prompt_len=8, max_tokens=4):
    seq = Sequence(seq_id, list(range(100, 100 + prompt_len)), SamplingOptions(max_tokens=max_tokens))
    seq.priority = priority
    sched.add(seq, priority * AGING)
    return seq


def test_a_higher_priority_arrival_is_admitted_before_earlier_lower_ones():
    sched, oracle = make(max_num_seqs=1)
    for i in range(4):
        add(sched, f"low{i}", priority=1)
    add(sched, "high", priority=0)
    _, admitted = run_all(sched, oracle)
    order = [seq_id for step in admitted for seq_id in step]
    assert order == ["high", "low0", "low1", "low2", "low3"]


def test_the_bound_on_overtaking_is_the_aging_offset():
    # a priority-1 request is overtaken by at most AGING later priority-0 arrivals
    sched, _ = make(max_num_seqs=1)
    low = add(sched, "low", priority=1)
    highs = [add(sched, f"high{i}", priority=0) for i in range(AGING + 5)]
    position = [s.seq_id for s in sched.waiting].index("low")
    assert position == AGING - 1 and all(h.arrival < low.arrival for h in highs[:AGING - 1])


def test_under_kv_pressure_the_lowest_priority_newest_is_preempted_first():
    # 8 blocks of 4 tokens; three 8-token prompts take 6, their decodes need more
    sched, oracle = make(num_blocks=8, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    urgent = add(sched, "urgent", priority=0, max_tokens=8)
    background = add(sched, "background", priority=2, max_tokens=8)
    normal = add(sched, "normal", priority=1, max_tokens=8)
    plan = sched.schedule()
    sched.postprocess(plan, oracle.step(plan))
    assert [s.seq_id for s in sched.running] == ["urgent", "normal", "background"]  # by priority, then arrival
    while background.num_preemptions == 0:
        plan = sched.schedule()
        sched.postprocess(plan, oracle.step(plan))
        sched.check_invariants()
    assert normal.num_preemptions == 0 and urgent.num_preemptions == 0
    assert background.status is SequenceStatus.WAITING
    run_all(sched, oracle)  # and every one still finishes
    assert all(s.is_finished for s in (urgent, normal, background))


def test_fcfs_keeps_arrival_order_without_offsets():
    sched, oracle = make(max_num_seqs=1)
    for i in range(3):
        add(sched, f"s{i}", priority=0)
    _, admitted = run_all(sched, oracle)
    assert [seq_id for step in admitted for seq_id in step] == ["s0", "s1", "s2"]
    assert not sched.ordered
