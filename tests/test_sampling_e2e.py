"""Sampling through both planes and the client library: logprobs equal HF's log_softmax, seeded tokens
do not depend on the batch or on preemption (penalties included), n samples stream with their index
and share the prompt's blocks, min_tokens, stop texts, special tokens, and bad values refused by name."""
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from client import SamplingParams
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from proto.nanoplane.v1 import generation_pb2
from tests.hf_reference import hf_model
from tests.stack import InProcessStack

EOS = 2  # the tiny models' eos_token_id: "<|im_end|>" in SmolLM2's tokenizer, a special token
# A prompt of special tokens and a repetition penalty far below 1 make the tiny model's greedy choice
# a prompt token: EOS right away, or "<|file_sep|>" five times and then EOS.
EOS_AT_ONCE = [2, 1, 2, 1, 2]
EOS_AFTER_FIVE = [5, 2, 9, 2, 2]
BOOST_PROMPT_TOKENS = dict(temperature=0.0, repetition_penalty=0.01)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def stack(model_path):
    s = InProcessStack(str(model_path), block_size=16, num_kv_blocks=64, max_num_batched_tokens=32)
    yield s
    s.close()


def random_prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 49152, n).tolist()


@torch.inference_mode()
def hf_logprobs(model_path, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position: row i is the distribution of token i + 1."""
    return hf_model(model_path)(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)


@torch.inference_mode()
def hf_greedy_with_penalties(model_path, prompt: list[int], max_new_tokens: int, repetition: float,
                             presence: float, frequency: float) -> list[int]:
    """Greedy decoding on HF's logits with HF's repetition processor, then OpenAI's presence and frequency."""
    model, tokens = hf_model(model_path), list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens])).logits[:, -1].float()
        logits = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([tokens]), logits)[0]
        counts = torch.bincount(torch.tensor(tokens[len(prompt):], dtype=torch.long), minlength=logits.shape[0])
        logits = logits - frequency * counts - presence * (counts > 0).float()
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def assert_matches(entry, reference: torch.Tensor, num_top: int) -> None:
    token = entry.token.token_id
    assert entry.token.logprob == pytest.approx(reference[token].item(), abs=2e-4)
    # The rank is exact up to ties within the logprob tolerance: a token whose HF logprob is within 2e-4 of the
    # chosen one may fall on either side of it in our float32 log-softmax.
    value = reference[token].item()
    assert int((reference > value + 2e-4).sum()) + 1 <= entry.token.rank <= int((reference > value - 2e-4).sum()) + 1
    top = reference.topk(num_top)
    assert [t.token_id for t in entry.top] == top.indices.tolist()
    assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=2e-4)
    assert [t.rank for t in entry.top] == list(range(1, num_top + 1))


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.3, top_k=50, seed=4,
                                                                   repetition_penalty=1.2)], ids=["greedy", "sampled"])
def test_logprobs_and_prompt_logprobs_equal_hf_log_softmax(stack, model_path, sampling):
    prompt = random_prompt(1, 45)  # two chunks of 32 tokens and more: prompt logprobs span steps
    result = stack.client.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=4,
                                                          prompt_logprobs=2, **sampling))
    reference = hf_logprobs(model_path, prompt + result.token_ids)
    assert [e.token.token_id for e in result.logprobs] == result.token_ids
    for i, entry in enumerate(result.logprobs):
        assert_matches(entry, reference[len(prompt) - 1 + i], 4)
    assert [e.token.token_id for e in result.prompt_logprobs] == prompt[1:]
    for j, entry in enumerate(result.prompt_logprobs):
        assert_matches(entry, reference[j], 2)


def test_logprobs_zero_gives_the_sampled_token_only_and_stream_alongside_tokens(stack):
    deltas = list(stack.client.generate_stream("Hello", SamplingParams(max_tokens=4, logprobs=0, seed=1,
                                                                         ignore_eos=True)))
    for delta in deltas:
        assert [e.token.token_id for e in delta.logprobs] == delta.token_ids
        assert all(e.top == [] for e in delta.logprobs)
    plain = stack.client.generate("Hello", SamplingParams(max_tokens=4, seed=1, ignore_eos=True))
    assert plain.logprobs == [] and plain.prompt_logprobs == []


def test_seeded_tokens_do_not_depend_on_the_batch_or_on_preemption(model_path):
    # 10 blocks of 16 tokens; four sequences of 30 + 30 tokens need 16 blocks together, so some are preempted
    stack = InProcessStack(str(model_path), block_size=16, num_kv_blocks=10)
    try:
        shared = random_prompt(2, 20)  # a full block in common: prefix-cache hits with penalties
        prompts = [random_prompt(3, 30), shared + random_prompt(4, 10), shared + random_prompt(5, 10),
                   random_prompt(6, 30)]
        params = [SamplingParams(max_tokens=30, ignore_eos=True, seed=100 + i, temperature=0.9, top_p=0.95,
                                 min_p=0.01 * i, repetition_penalty=1.0 + 0.2 * i, presence_penalty=0.5 * (i - 1),
                                 frequency_penalty=0.3 * i) for i in range(4)]
        greedy = [(1.5, 0.0, 0.0), (1.0, 0.4, 0.8)]  # (repetition, presence, frequency): each alone changes the tokens
        for i, (rep, presence, frequency) in enumerate(greedy):
            prompts.append(random_prompt(8 + i, 30))
            params.append(SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0, repetition_penalty=rep,
                                         presence_penalty=presence, frequency_penalty=frequency))
        alone = [stack.client.generate(p, sp) for p, sp in zip(prompts, params)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda a: stack.client.generate(*a), zip(prompts, params)))
        assert stack.scheduler.num_preemptions > 0
        for a, b in zip(alone, together):
            assert a.token_ids == b.token_ids
        assert len({tuple(r.token_ids) for r in alone}) == len(prompts)
        # and the penalties are the reference's: greedy on HF's logits with the same processors
        for prompt, result, penalties in zip(prompts[-2:], together[-2:], greedy):
            assert result.token_ids == hf_greedy_with_penalties(model_path, prompt, 30, *penalties)
            assert result.token_ids != hf_greedy_with_penalties(model_path, prompt, 30, 1.0, 0.0, 0.0)
    finally:
        stack.close()


def test_n_samples_stream_with_their_index_share_the_prompt_and_all_finish(stack):
    prompt = random_prompt(7, 40)  # two full blocks of 16 to share
    params = SamplingParams(n=4, max_tokens=5, temperature=1.0, seed=11, ignore_eos=True, logprobs=1)
    deltas = list(stack.client.generate_stream(prompt, params))
    assert {d.index for d in deltas} == {0, 1, 2, 3}
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1, 2, 3]
    results = stack.client.generate_n(prompt, params)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 5 == len(r.logprobs) for r in results)
    assert len({tuple(r.token_ids) for r in results}) == 4, "the samples should differ"
    # every sample but the first found the first's full prompt blocks in the prefix cache
    assert [r.usage.cached_prompt_tokens for r in results][1:] == [32, 32, 32]
    # sample i is the request alone with seed + i
    for r in results[:2]:
        alone = stack.client.generate(prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=11 + r.index,
                                                             ignore_eos=True))
        assert alone.token_ids == r.token_ids
    with pytest.raises(ValueError, match="generate_n"):
        stack.client.generate(prompt, params)
    stack.wait_idle()
    assert stack.num_free_blocks() == 64


def test_min_tokens_holds_back_eos_and_stop_token_ids(stack):
    assert stack.client.generate(EOS_AT_ONCE, SamplingParams(max_tokens=8, **BOOST_PROMPT_TOKENS)).token_ids == [EOS]
    held = stack.client.generate(EOS_AT_ONCE, SamplingParams(max_tokens=8, min_tokens=4, **BOOST_PROMPT_TOKENS))
    assert len(held.token_ids) > 4 and EOS not in held.token_ids[:4]
    as_stop_id = stack.client.generate(EOS_AT_ONCE, SamplingParams(max_tokens=8, min_tokens=3, ignore_eos=True,
                                                                   stop_token_ids=[EOS], **BOOST_PROMPT_TOKENS))
    assert len(as_stop_id.token_ids) > 3 and EOS not in as_stop_id.token_ids[:3]
    later = stack.client.generate(EOS_AFTER_FIVE, SamplingParams(max_tokens=8, min_tokens=2, **BOOST_PROMPT_TOKENS))
    assert later.token_ids[-1] == EOS and later.finish_reason == "stop" and len(later.token_ids) == 6


def test_skip_special_tokens_false_shows_them_and_the_stop_token_text_is_optional(stack):
    params = dict(max_tokens=6, ignore_eos=True, **BOOST_PROMPT_TOKENS)
    shown = stack.client.generate(EOS_AT_ONCE, SamplingParams(skip_special_tokens=False, **params))
    hidden = stack.client.generate(EOS_AT_ONCE, SamplingParams(**params))
    assert shown.token_ids == hidden.token_ids and EOS in shown.token_ids
    assert "<|im_end|>" in shown.text and "<|im_end|>" not in hidden.text
    # the EOS that ends a sequence stays out of the text unless include_stop_str_in_output
    stopped = dict(max_tokens=8, skip_special_tokens=False, **BOOST_PROMPT_TOKENS)
    without = stack.client.generate(EOS_AFTER_FIVE, SamplingParams(**stopped))
    including = stack.client.generate(EOS_AFTER_FIVE, SamplingParams(include_stop_str_in_output=True, **stopped))
    assert without.token_ids == including.token_ids and without.token_ids[-1] == EOS
    assert including.text == without.text + "<|im_end|>" and "<|im_end|>" not in without.text


def test_include_stop_str_in_output_keeps_the_matched_stop_string(stack):
    params = dict(max_tokens=24, temperature=0, ignore_eos=True)
    text = stack.client.generate("The weather today", SamplingParams(**params)).text
    stop = text[5:12]
    cut = stack.client.generate("The weather today", SamplingParams(stop=[stop], **params))
    kept = stack.client.generate("The weather today", SamplingParams(stop=[stop], include_stop_str_in_output=True,
                                                                     **params))
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert cut.text == text[:text.find(stop)] and kept.text == cut.text + stop


def _bad(**sampling):
    return generation_pb2.GenerateRequest(prompt="hi", sampling=generation_pb2.SamplingParams(**sampling))


BAD_SAMPLING = {
    "presence_penalty above 2": (_bad(presence_penalty=2.5), "sampling.presence_penalty"),
    "frequency_penalty below -2": (_bad(frequency_penalty=-2.1), "sampling.frequency_penalty"),
    "repetition_penalty 0": (_bad(repetition_penalty=0.0), "sampling.repetition_penalty"),
    "repetition_penalty negative": (_bad(repetition_penalty=-1.0), "sampling.repetition_penalty"),
    "top_k 0": (_bad(top_k=0), "sampling.top_k"),
    "min_p above 1": (_bad(min_p=1.5), "sampling.min_p"),
    "min_p negative": (_bad(min_p=-0.1), "sampling.min_p"),
    "logprobs above the maximum": (_bad(logprobs=21), "sampling.logprobs"),
    "logprobs negative": (_bad(logprobs=-1), "sampling.logprobs"),
    "prompt_logprobs above the maximum": (_bad(prompt_logprobs=100), "sampling.prompt_logprobs"),
    "n above the maximum": (_bad(n=17), "sampling.n"),
    "n zero": (_bad(n=0), "sampling.n"),
    "min_tokens above max_tokens": (_bad(min_tokens=9, max_tokens=8), "sampling.min_tokens"),
    "min_tokens negative": (_bad(min_tokens=-1), "sampling.min_tokens"),
}


@pytest.mark.parametrize("name", BAD_SAMPLING)
def test_bad_sampling_values_get_invalid_argument_naming_the_field(stack, name):
    request, field = BAD_SAMPLING[name]
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.stub.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
