"""Speculative decoding (docs/speculative.md) on a tiny random model: the real Scheduler and ModelRunner in one
process, stepped as the Engine steps them (one plan ahead). Greedy and seeded outputs are token-identical with
and without speculation; unseeded sampling keeps the target distribution (a chi-square test against the
non-speculative sampler); rejected drafts' KV goes back to the BlockManager and never enters the prefix cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from controlplane.config import ControlPlaneConfig
from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, Sequence
from controlplane.core.speculative import SpeculativeConfig, Speculator, propose_ngram
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from proto.step import RUN_SPECULATIVE
from tests.tiny_models import save_tiny_model

VOCAB = 512
NUM_BLOCKS = 256
BLOCK_SIZE = 16
MAX_SEQS = 256


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-spec"), vocab_size=VOCAB, seed=0)
    return ModelRunner(DataPlaneConfig(model=str(path), device="cpu", dtype="float32", block_size=BLOCK_SIZE,
                                       num_kv_blocks=NUM_BLOCKS, max_num_seqs=MAX_SEQS, max_num_batched_tokens=2048,
                                       max_model_len=512, num_threads=1))


def new_scheduler(k: int, **spec) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=MAX_SEQS,
                                          max_num_batched_tokens=2048, max_model_len=512, eos_token_ids=(2,)))
    if k:
        scheduler.speculator = Speculator(SpeculativeConfig("ngram", k, **spec))
    return scheduler


def run(runner: ModelRunner, scheduler: Scheduler, seqs: list[Sequence], reset: bool = True) -> list[list[int]]:
    """Steps scheduler and runner as the Engine does with overlap, checking the block accounting every step.
    reset: a new step session (an empty batch and KV cache: the scheduler's must be empty too)."""
    if reset:
        runner.reset()
    for seq in seqs:
        scheduler.add(seq)
    results = []
    while scheduler.has_unfinished() or scheduler.in_flight:
        plan = scheduler.schedule()
        if plan is not None:
            results.append(runner.execute(plan))
        if len(scheduler.in_flight) > (1 if plan is not None else 0):
            scheduler.postprocess(scheduler.in_flight[0].plan, results.pop(0))
        scheduler.check_invariants()
    return [seq.completion_token_ids for seq in seqs]


def copy_prompts(num: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves, so the n-gram proposer finds matches from the first decode."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(num):
        base = torch.randint(3, VOCAB, (7 + i,), generator=g).tolist()
        prompts.append(base * 4 + base[:3])
    return prompts


def seqs_for(prompts, **sampling) -> list[Sequence]:
    sampling.setdefault("max_tokens", 48)
    return [Sequence(f"s{i}", p, SamplingOptions(ignore_eos=True, **sampling)) for i, p in enumerate(prompts)]


def test_propose_ngram_takes_the_longest_suffix_and_its_most_recent_match():
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3, 1, 4) == [4, 5, 1]
    # "2 3" occurs at 1 and 5: the most recent wins; "8 2 3" (n = 3) occurs nowhere earlier
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3], 3, 1, 4) == [7, 8, 2]
    # the longer match wins over a more recent shorter one
    assert propose_ngram([5, 1, 2, 6, 7, 2, 9, 1, 2], 2, 1, 3) == [6, 7]
    assert propose_ngram([1, 2, 3, 4], 2, 1, 4) == []  # no earlier occurrence
    assert propose_ngram([1, 2, 3, 1], 2, 2, 4) == []  # only a 1-gram matches, below min_n
    # fewer than k follow the match: the copy goes on through its own drafts
    assert propose_ngram([4, 4, 4], 5, 1, 4) == [4, 4, 4, 4, 4]
    assert propose_ngram([7, 1, 2, 3, 1, 2], 5, 1, 4) == [3, 1, 2, 3, 1]


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_is_identical_with_speculation(runner, k):
    prompts = copy_prompts(6)
    base = dict(max_tokens=48, ignore_eos=True, temperature=0.0)
    # a mixed batch: one opts out per request, one has a penalty (never speculated), one a min_tokens ban
    options = [SamplingOptions(**base), SamplingOptions(**base, speculative=False),
               SamplingOptions(**base, presence_penalty=0.5), SamplingOptions(**base | {"ignore_eos": False},
                                                                           min_tokens=40),
               SamplingOptions(**base), SamplingOptions(**base)]
    plain = run(runner, new_scheduler(0), [Sequence(f"s{i}", p, o) for i, (p, o) in enumerate(zip(prompts, options))])
    scheduler = new_scheduler(k)
    speculated = run(runner, scheduler, [Sequence(f"s{i}", p, o) for i, (p, o) in enumerate(zip(prompts, options))])
    assert speculated == plain
    counters = scheduler.speculator.counters
    assert counters.num_accepted_tokens > 10 and counters.num_draft_tokens > counters.num_accepted_tokens
    assert scheduler.block_manager.num_free_blocks == NUM_BLOCKS  # every block back, rejected drafts' too


def test_stops_inside_the_accepted_drafts_and_max_tokens(runner):
    prompts = copy_prompts(4, seed=3)
    for max_tokens in (5, 13):
        plain = run(runner, new_scheduler(0), seqs_for(prompts, temperature=0.0, max_tokens=max_tokens))
        scheduler = new_scheduler(4)
        assert run(runner, scheduler, seqs_for(prompts, temperature=0.0, max_tokens=max_tokens)) == plain
        assert all(len(out) == max_tokens for out in plain)
    # a stop token among the drafts: the output ends with it and nothing after it
    stop = plain[0][6]
    stopped = run(runner, new_scheduler(4), [Sequence("s", prompts[0], SamplingOptions(
        max_tokens=13, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,)))])
    assert stopped[0] == plain[0][:plain[0].index(stop) + 1]


def test_seeded_sampling_is_reproducible_and_the_same_as_without_speculation(runner):
    prompts = copy_prompts(5, seed=1)
    options = dict(temperature=0.3, top_k=50, top_p=0.95, min_p=0.01)
    plain = run(runner, new_scheduler(0), [Sequence(f"s{i}", p, SamplingOptions(
        max_tokens=40, ignore_eos=True, seed=100 + i, **options)) for i, p in enumerate(prompts)])
    scheduler = new_scheduler(3)
    speculated = run(runner, scheduler, [Sequence(f"s{i}", p, SamplingOptions(
        max_tokens=40, ignore_eos=True, seed=100 + i, **options)) for i, p in enumerate(prompts)])
    assert scheduler.speculator.counters.num_accepted_tokens > 0
    assert speculated == plain
    # alone in the batch, the same seed gives the same tokens
    alone = run(runner, new_scheduler(3), [Sequence("x", prompts[2], SamplingOptions(
        max_tokens=40, ignore_eos=True, seed=102, **options))])
    assert alone[0] == plain[2]


def test_unseeded_sampling_keeps_the_target_distribution(runner):
    """Chi-square of each output position's token counts, speculative against plain sampling: the positions
    after the first come from speculative steps, where drafts are accepted and rejected."""
    prompt = copy_prompts(1, seed=2)[0]
    num_samples = 1200
    # a low temperature: the random model's drafts are then accepted about two times in three
    options = dict(max_tokens=4, ignore_eos=True, temperature=0.3, top_k=40, top_p=0.98, min_p=0.002)
    torch.manual_seed(0)
    runner.generator.manual_seed(1)
    plain = np.array(run(runner, new_scheduler(0), [Sequence(f"a{i}", prompt, SamplingOptions(**options))
                                                    for i in range(num_samples)]))
    scheduler = new_scheduler(3, disable_batch_size=0, min_acceptance=0.0)
    runner.generator.manual_seed(2)
    speculated = np.array(run(runner, scheduler, [Sequence(f"b{i}", prompt, SamplingOptions(**options))
                                                  for i in range(num_samples)]))
    counters = scheduler.speculator.counters
    # both branches are exercised a good deal: drafts accepted, and rejected (the residual distribution)
    assert counters.num_accepted_tokens > 250
    assert counters.num_draft_tokens - counters.num_accepted_tokens > 100
    for position in range(1, 4):
        tokens = np.union1d(plain[:, position], speculated[:, position])
        table = np.array([[np.count_nonzero(col[:, position] == t) for t in tokens] for col in (plain, speculated)])
        frequent = table.sum(axis=0) >= 10
        table = np.column_stack([table[:, frequent], table[:, ~frequent].sum(axis=1)])
        assert table.shape[1] >= 4, "a distribution too peaked to test"
        p_value = chi2_contingency(table)[1]
        assert p_value > 1e-3, f"position {position}: p = {p_value}"


def test_rejected_drafts_never_enter_the_prefix_cache(runner):
    """A sequence whose prompt is an earlier speculative sequence's whole output hits the blocks that sequence
    filled, accepted drafts and all, and continues exactly as without the cache."""
    prompts = copy_prompts(3, seed=4)
    scheduler = new_scheduler(4)
    first = run(runner, scheduler, seqs_for(prompts, temperature=0.0, max_tokens=60))
    assert scheduler.speculator.counters.num_accepted_tokens > 0
    follow_ups = [p + out for p, out in zip(prompts, first)]
    hit = [Sequence(f"f{i}", p, SamplingOptions(max_tokens=16, temperature=0.0, ignore_eos=True))
           for i, p in enumerate(follow_ups)]
    cached = run(runner, scheduler, hit, reset=False)  # the same session: its prefix cache is warm
    assert all(seq.num_cached_prompt_tokens >= BLOCK_SIZE * 4 for seq in hit)
    cold = new_scheduler(0)
    cold.block_manager.enable_prefix_caching = False
    assert cached == run(runner, cold, seqs_for(follow_ups, temperature=0.0, max_tokens=16))


def test_backs_off_for_a_large_batch_and_plans_rewinds(runner):
    prompts = copy_prompts(4, seed=5)
    scheduler = new_scheduler(4, disable_batch_size=3)
    run(runner, scheduler, seqs_for(prompts, temperature=0.0, max_tokens=8))
    assert scheduler.speculator.counters.num_drafts == 0
    scheduler = new_scheduler(4, disable_batch_size=4)
    for seq in seqs_for(prompts, temperature=0.0, max_tokens=30):
        scheduler.add(seq)
    runner.reset()
    flagged = rewinds = 0
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        flagged += int(np.count_nonzero(plan.run_flags & RUN_SPECULATIVE))
        rewinds += len(plan.rewind_slots)
        scheduler.postprocess(plan, runner.execute(plan))
    assert flagged and rewinds


def test_options_out_of_range_are_clear_errors():
    for options, message in (
            (dict(speculative_method="ngram", num_speculative_tokens=0), "--num-speculative-tokens must be in [1, 16]"),
            (dict(speculative_method="ngram", num_speculative_tokens=17), "--num-speculative-tokens must be in [1, 16]"),
            (dict(speculative_method="eagle", num_speculative_tokens=2), "--speculative-method must be one of ngram"),
            (dict(num_speculative_tokens=2), "--num-speculative-tokens needs --speculative-method ngram"),
            (dict(speculative_method="ngram", num_speculative_tokens=2, speculative_ngram_min=3,
                  speculative_ngram_max=2), "1 <= min <= max")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ControlPlaneConfig(**options).validate()
    ControlPlaneConfig(speculative_method="ngram", num_speculative_tokens=5).validate()


def test_through_both_planes_greedy_and_n_samples(tiny_model_dir):
    """The real stack (data plane process, shared-memory steps, gRPC API): a request that opts out gets the same
    greedy tokens as one that speculates; n > 1 samples speculate each on its own; logprobs still come back."""
    from client import SamplingParams
    from nanoplane import LLM

    prompt = copy_prompts(1, seed=6)[0]
    with LLM(str(tiny_model_dir("qwen3")), enforce_eager=True, num_kv_blocks=128, speculative_method="ngram",
             num_speculative_tokens=3) as llm:
        on, off, n, lp = llm.generate([prompt] * 4, [
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, speculative=False),
            SamplingParams(temperature=0.5, seed=3, n=3, max_tokens=32, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)], use_tqdm=False)
    assert on["token_ids"] == off["token_ids"] == lp["token_ids"]
    assert len(lp["logprobs"]) == 32
    assert len(n["outputs"]) == 3 and all(len(o["token_ids"]) == 32 for o in n["outputs"])


def test_a_lost_data_plane_forgets_the_drafts_in_flight(runner):
    """reset_dataplane while a speculative step is in flight: its result never comes; the sequences are
    recomputed and end as they would have."""
    prompts = copy_prompts(3, seed=7)
    plain = run(runner, new_scheduler(0), seqs_for(prompts, temperature=0.0, max_tokens=24))
    scheduler = new_scheduler(4)
    seqs = seqs_for(prompts, temperature=0.0, max_tokens=24)
    runner.reset()
    for seq in seqs:
        scheduler.add(seq)
    while True:
        plan = scheduler.schedule()
        result = runner.execute(plan)
        if np.any(plan.run_flags & RUN_SPECULATIVE):
            break  # its result is lost with the data plane
        scheduler.postprocess(plan, result)
    scheduler.reset_dataplane()
    assert run(runner, scheduler, []) == [] and [s.completion_token_ids for s in seqs] == plain


def test_k_out_of_range_fails_the_server_at_start_up():
    from tests.test_cli_errors import nanoplane, one_line_error

    line = one_line_error(nanoplane("controlplane", "--port", "0", "--speculative-method", "ngram",
                                    "--num-speculative-tokens", "0"))
    assert "--num-speculative-tokens must be in [1, 16] with --speculative-method ngram, got 0" in line


def test_spec_decode_metrics_count_drafts_and_acceptance(runner):
    from controlplane.ops.metrics import Metrics
    from controlplane.ops.telemetry import EngineTelemetry

    scheduler = new_scheduler(2)
    metrics = Metrics({"model_name": "tiny"})
    EngineTelemetry(scheduler, metrics)
    run(runner, scheduler, seqs_for(copy_prompts(2, seed=8), temperature=0.0, max_tokens=20))
    c, text = scheduler.speculator.counters, metrics.render()
    assert c.num_accepted_tokens > 0 and c.accepted_per_position[0] >= c.accepted_per_position[1]
    assert f'nanoplane:spec_decode_num_drafts_total{{model_name="tiny"}} {float(c.num_drafts)}' in text
    assert f'nanoplane:spec_decode_num_draft_tokens_total{{model_name="tiny"}} {float(c.num_draft_tokens)}' in text
    assert f'nanoplane:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {float(c.num_accepted_tokens)}' in text
    for position in (0, 1):
        assert (f'nanoplane:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="{position}"}} '
                f'{float(c.accepted_per_position[position])}') in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_drafts_run_as_decode_rows_in_the_cuda_graphs_and_keep_greedy_tokens(tmp_path):
    """On the GPU a step of decodes and drafts runs each draft as a one-token decode row (its context ending at
    itself) through the decode CUDA graphs; in fp32 the greedy tokens equal the non-speculative run's."""
    path = save_tiny_model("qwen3", tmp_path, vocab_size=VOCAB, seed=0)
    cuda = ModelRunner(DataPlaneConfig(model=str(path), device="cuda", dtype="float32", attention_backend="triton",
                                       block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, max_num_seqs=32,
                                       max_num_batched_tokens=2048, max_model_len=512))
    assert cuda.graphs is not None and cuda.graphs.use_graphs
    graph_steps = []
    original_run = cuda.graphs.run
    cuda.graphs.run = lambda ids, positions, meta: graph_steps.append(meta.num_seqs) or original_run(ids, positions,
                                                                                                     meta)

    def scheduler(k: int) -> Scheduler:
        s = Scheduler(SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=32,
                                      max_num_batched_tokens=2048, max_model_len=512, eos_token_ids=(2,)))
        if k:
            s.speculator = Speculator(SpeculativeConfig("ngram", k))
        return s

    prompts = copy_prompts(4)
    plain = run(cuda, scheduler(0), seqs_for(prompts, temperature=0.0))
    plain_graph_steps, graph_steps[:] = list(graph_steps), []
    spec = scheduler(4)
    speculated = run(cuda, spec, seqs_for(prompts, temperature=0.0))
    assert speculated == plain
    assert spec.speculator.counters.num_accepted_tokens > 10
    assert plain_graph_steps and max(graph_steps) > max(plain_graph_steps)  # draft rows went through the graphs
