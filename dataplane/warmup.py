"""A few synthetic steps before the data plane says it is ready, so the first real requests do not pay
for compiling kernels.

Triton compiles a kernel the first time it meets a new specialisation (an integer argument that is 1,
or a multiple of 16, or neither; a pointer's alignment), about a second each on an H100. Sizing the KV
cache runs one prefill of max_num_batched_tokens tokens and capturing the CUDA graphs runs the decode
kernels, but a real request's prefill of an odd number of tokens, a prefill mixed with decodes, or the
fused sampler would each compile on first use, in the middle of a user's time to first token.

warm_up(runner) runs, through the runner's own launch path: two prompts of odd lengths (one sampled at
a temperature through the fused sampler, one greedy), then their decodes mixed with a third prompt
(top-p, through the torch sampler), then a decode step, then drops them all. It writes only KV blocks
that no sequence holds yet, resets the batch and reseeds the sampler's generator after, so that what
follows is exactly what a runner without it would do.
"""
from __future__ import annotations

import time

import numpy as np
import structlog

from proto.sampling_schema import DATAPLANE_OPTIONS, column_values
from proto.step import PLAN_ARRAYS, RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan

log = structlog.get_logger("dataplane.warmup")

PROMPT_LENS = (21, 18, 13)  # token counts of the steps not multiples of 16 (nor 1); two prompts span 2 blocks
NUM_DECODES = 2


def _blocks(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def warm_up_plans(block_size: int, vocab_size: int) -> list[StepPlan]:
    """The synthetic steps: slots 0 and 1 prefill, then decode with slot 2's prefill, then all decode,
    then all drop. Block ids from 0 up, each sequence's own."""
    rng = np.random.default_rng(0)
    lens = [n + NUM_DECODES + 1 for n in PROMPT_LENS]
    first_block = np.concatenate([[0], np.cumsum([_blocks(n, block_size) for n in lens])]).astype(np.int32)

    def new(slots: list[int], temperature: list[float], top_p: list[float]) -> dict:
        k = len(slots)
        given = {"temperature": temperature, "top_p": top_p}  # the other options at their defaults
        sampling = {column.field: np.array(column_values(given.get(option.name, [option.default] * k), column),
                                           PLAN_ARRAYS[column.field])
                    for option in DATAPLANE_OPTIONS for column in option.columns}
        block_slots = np.concatenate([np.full(_blocks(lens[s], block_size), s, np.int32) for s in slots])
        block_indices = np.concatenate([np.arange(_blocks(lens[s], block_size), dtype=np.int32) for s in slots])
        block_ids = np.concatenate([np.arange(first_block[s], first_block[s + 1], dtype=np.int32) for s in slots])
        return dict(
            new_slots=np.array(slots, np.int32), new_num_cached_tokens=np.zeros(k, np.int32),
            new_num_prompt_tokens=np.array([PROMPT_LENS[s] for s in slots], np.int32), **sampling,
            new_num_stop_ids=np.zeros(k, np.int32), block_slots=block_slots, block_indices=block_indices,
            block_ids=block_ids)

    def prompt(slot: int) -> np.ndarray:
        return rng.integers(0, vocab_size, PROMPT_LENS[slot]).astype(np.int32)

    def runs(prefills: list[int], decodes: list[int]) -> dict:
        slots = decodes + prefills
        return dict(
            run_slots=np.array(slots, np.int32),
            run_num_tokens=np.array([1] * len(decodes) + [PROMPT_LENS[s] for s in prefills], np.int32),
            run_flags=np.array([RUN_SAMPLE] * len(decodes) + [RUN_SAMPLE | RUN_TOKENS_IN_PLAN] * len(prefills),
                               np.uint8),
            token_ids=np.concatenate([prompt(s) for s in prefills]) if prefills else np.zeros(0, np.int32))

    return [
        StepPlan(step_id=0, **new([0, 1], [0.7, 0.0], [1.0, 1.0]), **runs([0, 1], [])),
        StepPlan(step_id=1, **new([2], [0.7], [0.9]), **runs([2], [0, 1])),
        StepPlan(step_id=2, **runs([], [0, 1, 2])),
        StepPlan(step_id=3, drop_slots=np.array([0, 1, 2], np.int32)),
    ]


def warm_up(runner) -> None:
    """Runs warm_up_plans on the runner, then leaves it as it was (an empty batch, the generator reseeded)."""
    cfg = runner.config
    plans = warm_up_plans(cfg.block_size, runner.model_config.vocab_size)
    if sum(len(plan.block_ids) for plan in plans) > runner.num_blocks or cfg.max_num_seqs < len(PROMPT_LENS) \
            or max(plan.run_num_tokens.sum() for plan in plans) > cfg.max_num_batched_tokens \
            or max(PROMPT_LENS) + NUM_DECODES + 1 > runner.max_model_len:
        log.info("warm-up skipped: the KV cache, batch or step budget is smaller than its three short sequences")
        return
    started = time.perf_counter()
    try:
        for plan in plans:
            plan.check()
            runner.execute(plan)
    finally:
        runner.reset()
        runner.generator.manual_seed(cfg.seed)
    log.info("warmed up", steps=len(plans), seconds=round(time.perf_counter() - started, 2))
