"""Overlap never streams a token past a stop condition: the same requests, run together through both
planes with the control plane planning one step ahead (the default) and with --no-overlap, stream
identical deltas (text, token ids, finish reason) for stop strings, stop_token_ids, EOS, max_tokens
and min_tokens with EOS; the tokens sampled ahead for sequences that had stopped are discarded, at
most one per stopped sequence."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from client import SamplingParams
from tests.stack import InProcessStack

EOS = 2  # the tiny models' eos_token_id
# with a repetition penalty far below 1 the tiny model repeats a prompt token: EOS at once or after five
EOS_AT_ONCE = [2, 1, 2, 1, 2]
EOS_AFTER_FIVE = [5, 2, 9, 2, 2]
BOOST_PROMPT_TOKENS = dict(temperature=0.0, repetition_penalty=0.01)
GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPT = "The weather today"


@pytest.fixture(scope="module")
def stacks(tiny_model_dir):
    path = str(tiny_model_dir("qwen3"))
    made = {}
    try:
        for overlap in (True, False):
            made[overlap] = InProcessStack(path, control_plane_options={"overlap": overlap}, block_size=16,
                                           num_kv_blocks=64, max_num_batched_tokens=64)
        yield made
    finally:
        for stack in made.values():
            stack.close()


def stream(stack, prompt, params) -> list[tuple[str, list[int], str | None]]:
    return [(d.text, list(d.token_ids), d.finish_reason) for d in stack.client.generate_stream(prompt, params)]


def requests(stack) -> dict[str, tuple]:
    free_run = stack.client.generate(PROMPT, SamplingParams(max_tokens=16, **GREEDY))
    stop_string = free_run.text[6:10]
    assert stop_string.strip() and free_run.text.find(stop_string) > 0
    return {
        "stop string": (PROMPT, SamplingParams(max_tokens=16, stop=[stop_string], **GREEDY)),
        "stop string kept": (PROMPT, SamplingParams(max_tokens=16, stop=[stop_string], include_stop_str_in_output=True,
                                                    **GREEDY)),
        "stop_token_ids": (PROMPT, SamplingParams(max_tokens=16, stop_token_ids=[free_run.token_ids[4]], **GREEDY)),
        "eos": (EOS_AFTER_FIVE, SamplingParams(max_tokens=12, **BOOST_PROMPT_TOKENS)),
        "min_tokens with eos": (EOS_AT_ONCE, SamplingParams(max_tokens=8, min_tokens=4, **BOOST_PROMPT_TOKENS)),
        "max_tokens": (PROMPT, SamplingParams(max_tokens=7, **GREEDY)),
        "n=2 with a stop id": (PROMPT, SamplingParams(max_tokens=10, n=2, temperature=1.0, seed=3,
                                                      stop_token_ids=[free_run.token_ids[2]])),
    }


def run_together(stack, reqs: dict[str, tuple]) -> dict[str, list]:
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = {name: pool.submit(stream, stack, *args) for name, args in reqs.items()}
        return {name: f.result() for name, f in futures.items()}


def test_overlap_streams_exactly_what_no_overlap_streams(stacks):
    reqs = requests(stacks[False])
    got = {}
    for overlap, stack in stacks.items():
        before = stack.engine.num_discarded_tokens
        got[overlap] = run_together(stack, reqs)
        stack.wait_idle()
        discarded = stack.engine.num_discarded_tokens - before
        num_stopped = sum(d[2] == "stop" for deltas in got[overlap].values() for d in deltas)
        if overlap:
            assert 1 <= discarded <= num_stopped  # each stop was planned past once at most
        else:
            assert discarded == 0
    for name in reqs:
        assert got[True][name] == got[False][name], name
    finishes = {name: [d[2] for d in deltas if d[2]] for name, deltas in got[True].items()}
    assert finishes["max_tokens"] == ["length"]
    assert all(finishes[name] == ["stop"] for name in ("stop string", "stop string kept", "stop_token_ids", "eos"))
    stop_string = reqs["stop string"][1].stop[0]
    assert stop_string not in "".join(d[0] for d in got[True]["stop string"])
    assert "".join(d[0] for d in got[True]["stop string kept"]).endswith(stop_string)
    tokens = [t for d in got[True]["min_tokens with eos"] for t in d[1]]
    assert len(tokens) > 4 and EOS not in tokens[:4]


def test_a_sequence_ending_by_length_costs_no_discarded_token(stacks):
    stack = stacks[True]
    before = stack.engine.num_discarded_tokens
    result = stack.client.generate(PROMPT, SamplingParams(max_tokens=5, **GREEDY))
    stack.wait_idle()
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert stack.engine.num_discarded_tokens == before
