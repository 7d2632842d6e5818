"""A steady decode step reuses what BatchState derived from the last step's plan (the step layout, the
sampled slots' params and sampler decision). Over a real Scheduler's steps, with sequences that finish,
are preempted and whose slots are taken by new ones with other params, each reused answer must
equal the one computed afresh from the plan and the params of that step."""
import dataclasses

import numpy as np
import torch

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, Sequence
from dataplane.batch_state import BatchState
from dataplane.sampling.sampler import decide_sampling
from dataplane.sampling.sampling_params import SAMPLER_COLUMNS, PackedColumns
from dataplane.step_layout import layout_of
from proto.nanoplane.v1 import dataplane_pb2
from proto.step import decode_plan, encode_plan
from tests.controlplane.kv_oracle import context_hash_sampler, oracle_for

VOCAB, EOS, BLOCK, SLOTS = 40, 39, 4, 3


def assert_same(reused, fresh, what: str) -> None:
    for field in dataclasses.fields(fresh):
        a, b = getattr(reused, field.name), getattr(fresh, field.name)
        if isinstance(b, PackedColumns):
            a, b = a.upload(lambda x, dt: x.copy()), b.upload(lambda x, dt: x.copy())
            a.pop("positions", None), b.pop("positions", None)  # each step writes its own into the reused packing
            assert a.keys() == b.keys(), what
            for name in b:
                assert np.array_equal(a[name], b[name]), f"{what}.{field.name}.{name}"
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{what}.{field.name}"
        else:
            assert a == b, f"{what}.{field.name}"


def test_reused_layouts_and_params_equal_fresh_ones():
    rng = np.random.default_rng(0)
    options = [dict(temperature=0.0), dict(temperature=0.8, top_k=5), dict(temperature=0.7, seed=3),
               dict(logprobs=2), dict(repetition_penalty=1.2), dict(min_tokens=3, stop_token_ids=(7, 8)),
               dict(temperature=1.0, top_p=0.5, min_p=0.1)]
    sched = Scheduler(SchedulerConfig(num_blocks=24, block_size=BLOCK, max_num_seqs=SLOTS, max_num_batched_tokens=8,
                                      max_model_len=24 * BLOCK, eos_token_ids=(EOS,)))
    for i in range(14):
        prompt = rng.integers(0, VOCAB - 1, int(rng.integers(1, 9))).tolist()
        sched.add(Sequence(f"s{i}", prompt, SamplingOptions(max_tokens=int(rng.integers(2, 9)), ignore_eos=True,
                                                            **options[i % len(options)])))
    batch = BatchState(SLOTS, 24, BLOCK, 24, 24 * BLOCK, VOCAB + 1, torch.device("cpu"))
    oracle = oracle_for(sched, context_hash_sampler(VOCAB))
    layouts_reused = selections_reused = 0
    last_layout = last_selection = None
    while sched.has_unfinished():
        plan = decode_plan(encode_plan(sched.schedule(), dataplane_pb2.StepPlan))
        inputs = batch.apply(plan)
        if inputs is not None:
            layout = batch.layouts.of(plan)
            assert_same(layout, layout_of(plan), "layout")
            layouts_reused += layout is last_layout
            params, slots = batch.sampling.params, layout.sampled_slots
            selection = params.selection(slots)
            assert_same(selection, params.select(slots.copy()), "selection")
            selections_reused += selection is last_selection
            decision = decide_sampling(**{n: getattr(params, n)[slots] for n in SAMPLER_COLUMNS if n != "seed"},
                                       vocab_size=VOCAB + 1)
            assert_same(batch.sampling._decided[1], decision, "decision")
            last_layout, last_selection = layout, selection
        result = oracle.step(plan)
        batch.record_sampled(result.slots, torch.from_numpy(result.token_ids.astype(np.int64)))
        sched.postprocess(plan, result)
    assert layouts_reused > 5 and selections_reused > 5, (layouts_reused, selections_reused)
