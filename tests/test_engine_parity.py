"""Greedy tokens through both planes (real gRPC between them) equal HF transformers' token for token,
across block boundaries, prefix-cache hits, chunked prefill and preemption."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client import SamplingParams
from tests.hf_reference import hf_greedy
from tests.stack import TRANSPORTS, InProcessStack

GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompt(rng, n):
    return rng.integers(3, 49152, size=n).tolist()


def generate_all(stack, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: stack.client.generate(p, params), prompts))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_concurrent_greedy_matches_hf(arch, transport, tiny_model_dir):
    path = tiny_model_dir(arch)
    stack = InProcessStack(str(path), block_size=16, transport=transport)
    try:
        start_free = stack.num_free_blocks()
        rng = np.random.default_rng(1)
        prompts = [random_prompt(rng, n) for n in (5, 23, 41)]  # 41 tokens cross two block boundaries
        results = generate_all(stack, prompts, max_tokens=12)
        for prompt, result in zip(prompts, results):
            assert result.token_ids == hf_greedy(path, prompt, 12)
            assert result.finish_reason == "length"
            assert result.usage.prompt_tokens == len(prompt) and result.usage.completion_tokens == 12
        stack.wait_idle()
        assert stack.num_free_blocks() == start_free
    finally:
        stack.close()


def test_prefix_cache_hit_gives_same_tokens(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    stack = InProcessStack(str(path), block_size=16)
    try:
        rng = np.random.default_rng(2)
        shared = random_prompt(rng, 50)
        first = stack.client.generate(shared + [17, 18], SamplingParams(max_tokens=6, **GREEDY))
        second = stack.client.generate(shared + [99, 100, 101], SamplingParams(max_tokens=6, **GREEDY))
        assert first.usage.cached_prompt_tokens == 0
        assert second.usage.cached_prompt_tokens == 48  # three full blocks of the shared 50 tokens
        assert second.token_ids == hf_greedy(path, shared + [99, 100, 101], 6)
    finally:
        stack.close()


def test_chunked_prefill_gives_same_tokens(tiny_model_dir):
    path = tiny_model_dir("llama")
    stack = InProcessStack(str(path), block_size=16, max_num_batched_tokens=32, max_num_seqs=4)
    try:
        rng = np.random.default_rng(3)
        prompts = [random_prompt(rng, 70), random_prompt(rng, 9)]
        results = generate_all(stack, prompts, max_tokens=8)
        for prompt, result in zip(prompts, results):
            assert result.token_ids == hf_greedy(path, prompt, 8)
        assert stack.control_plane.engine.num_steps > 3  # the 70-token prompt needed several chunks
    finally:
        stack.close()


def test_preemption_under_a_small_kv_cache_gives_same_tokens(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    # 10 blocks of 16 = 160 tokens; four sequences of 30 + 30 tokens need 16 blocks together
    stack = InProcessStack(str(path), block_size=16, num_kv_blocks=10)
    try:
        rng = np.random.default_rng(4)
        prompts = [random_prompt(rng, 30) for _ in range(4)]
        results = generate_all(stack, prompts, max_tokens=30)
        for prompt, result in zip(prompts, results):
            assert result.token_ids == hf_greedy(path, prompt, 30)
        assert stack.scheduler.num_preemptions > 0
        stack.wait_idle()
        assert stack.num_free_blocks() == 10
    finally:
        stack.close()
