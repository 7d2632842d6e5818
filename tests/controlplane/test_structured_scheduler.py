"""Structured output in the Scheduler, with real xgrammar matchers and SmolLM2's tokenizer: a constrained
sequence is planned only when none of its tokens is in flight while an unconstrained one decodes every
step, its plan rows carry the matcher's bitmask, accepted tokens advance the matcher and EOS at the
grammar's end finishes it; and the control plane loads xgrammar where torch cannot be imported."""
import subprocess
import sys

import numpy as np
import pytest

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import FinishReason, SamplingOptions, Sequence
from controlplane.structured.compiler import StructuredOutputCompiler
from controlplane.structured.spec import StructuredOutputSpec
from proto.step import RUN_SAMPLE, StepResult

EOS = 2
VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from controlplane.serving.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return StructuredOutputCompiler.for_tokenizer(tokenizer, VOCAB, [EOS])


def allowed(plan, row: int) -> np.ndarray:
    words = plan.grammar_words_per_row
    mask = plan.grammar_bitmask[row * words:(row + 1) * words]
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))


def result_for(plan, tokens: dict[int, int]) -> StepResult:
    slots = plan.run_slots[(plan.run_flags & RUN_SAMPLE) != 0]
    return StepResult(step_id=plan.step_id, slots=slots.astype(np.int32),
                      token_ids=np.array([tokens[int(s)] for s in slots], dtype=np.int32))


def test_constrained_rows_wait_for_their_token_and_the_grammar_ends_them(tokenizer, compiler):
    choice = compiler.compile(StructuredOutputSpec.choice(["yes", "no"]))
    sched = Scheduler(SchedulerConfig(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                                      max_model_len=128, eos_token_ids=(EOS,)))
    free = Sequence("free", [5, 6, 7], SamplingOptions(max_tokens=20, ignore_eos=True))
    constrained = Sequence("c", [5, 6, 7], SamplingOptions(max_tokens=20, structured_output=choice))
    sched.add(free)
    sched.add(constrained)
    yes = tokenizer.encode("yes", add_special_tokens=False)
    assert len(yes) == 1  # one token for "yes" in SmolLM2's vocabulary: the grammar is done after it

    first = sched.schedule()  # both prefill and sample; only the constrained row has a mask
    assert list(first.grammar_rows) == [1]
    assert set(allowed(first, 0)) >= {yes[0]} and EOS not in allowed(first, 0)
    second = sched.schedule()  # overlap: the first result is not back, so the constrained row waits
    assert list(second.run_slots) == [free.slot] and len(second.grammar_rows) == 0
    sched.postprocess(first, result_for(first, {free.slot: 11, constrained.slot: yes[0]}))
    assert constrained.grammar.num_accepted == 1
    third = sched.schedule()  # its token is known: planned again, and now only EOS is allowed
    assert sorted(third.run_slots) == sorted([free.slot, constrained.slot])
    assert list(third.grammar_rows) == [list(third.run_slots).index(constrained.slot)]
    assert list(allowed(third, 0)) == [EOS]
    sched.postprocess(second, result_for(second, {free.slot: 12}))
    sched.postprocess(third, result_for(third, {free.slot: 13, constrained.slot: EOS}))
    assert constrained.finish_reason is FinishReason.STOP and constrained.stop_token_id == EOS
    assert constrained.completion_token_ids == [yes[0], EOS] and sched.num_constrained == 0
    assert free.completion_token_ids == [11, 12, 13] and free.finish_reason is None


def test_a_grammar_refusing_the_token_ends_the_sequence(compiler):
    """The data plane samples inside the mask; a token outside it (a vocabulary mismatch) aborts the row."""
    grammar = compiler.compile(StructuredOutputSpec("regex", "[0-9]+"))
    sched = Scheduler(SchedulerConfig(num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
                                      max_model_len=32, eos_token_ids=(EOS,)))
    seq = Sequence("c", [5, 6], SamplingOptions(max_tokens=5, structured_output=grammar))
    sched.add(seq)
    plan = sched.schedule()
    not_allowed = next(t for t in range(100, VOCAB) if t not in set(allowed(plan, 0)))
    sched.postprocess(plan, result_for(plan, {seq.slot: not_allowed}))
    assert seq.finish_reason is FinishReason.ABORT


def test_a_moved_sequence_keeps_its_matcher(tokenizer, compiler):
    """Another data plane adopts a constrained sequence (failover, drain): its matcher, which accepted the
    tokens generated so far, goes with it, and each Scheduler counts only the constrained ones it holds."""
    choice = compiler.compile(StructuredOutputSpec.choice(["yes", "no"]))
    yes = tokenizer.encode("yes", add_special_tokens=False)[0]

    def scheduler():
        return Scheduler(SchedulerConfig(num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
                                         max_model_len=32, eos_token_ids=(EOS,)))

    first, second = scheduler(), scheduler()
    seq = Sequence("c", [5, 6, 7], SamplingOptions(max_tokens=8, structured_output=choice))
    first.add(seq)
    plan = first.schedule()
    first.postprocess(plan, result_for(plan, {seq.slot: yes}))
    assert first.remove_all() == [seq] and first.num_constrained == 0
    second.add(seq)
    assert second.num_constrained == 1 and seq.grammar.num_accepted == 1
    plan = second.schedule()  # re-prefills prompt + "yes"; the grammar now allows only EOS
    assert list(allowed(plan, 0)) == [EOS]


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # importing torch fails, as on the control plane's slim image
from controlplane.serving.tokenizer import load_tokenizer
from controlplane.structured.compiler import StructuredOutputCompiler
from controlplane.structured.spec import StructuredOutputSpec
from controlplane.structured.grammar_state import BitmaskFiller
compiler = StructuredOutputCompiler.for_tokenizer(load_tokenizer(sys.argv[1]), 49152, [2])
grammar = compiler.compile(StructuredOutputSpec("json_schema", '{"type": "object"}'))
mask = BitmaskFiller(threads=1).fill([grammar.new_state()], grammar.vocab_size)
print(mask.shape, int(sum(bin(w & 0xFFFFFFFF).count("1") for w in mask[0].tolist())))
"""


def test_xgrammar_loads_where_torch_cannot_be_imported(tokenizer_dir):
    out = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tokenizer_dir)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, num_allowed = out.stdout.strip().rsplit(" ", 1)
    assert shape == "(1, 1536)" and 0 < int(num_allowed) < 100  # "{" and a few tokens starting an object
