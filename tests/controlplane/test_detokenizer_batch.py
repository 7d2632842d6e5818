"""BatchDetokenizer (one batch decode per step for many sequences, whole tokens from a table) gives
exactly the deltas of IncrementalDetokenizer.add per sequence, with stop strings, min_tokens (check_stop
off), special tokens shown or skipped, multi-byte characters split across tokens, ids past the
tokenizer's vocabulary, and sequences that stopped."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from controlplane.serving.detokenizer import BatchDetokenizer, DetokenizerDelta, IncrementalDetokenizer
from controlplane.serving.tokenizer import load_tokenizer
from tests.controlplane.test_detokenizer import BROKEN_TEXT, token_pool  # noqa: F401 (a fixture)

TEXT = "The quick brown fox 😀 jumps over 世界, naïve café. STOP here!\nAnd the lazy dog sleeps."
OPTIONS = [dict(), dict(stop=["STOP"]), dict(stop=["dog", "ee"], include_stop_str_in_output=True),
           dict(skip_special_tokens=False), dict(skip_special_tokens=False, stop=["é"]), dict(stop=["😀", "界"])]


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def batch(tok):
    return BatchDetokenizer(tok)


class DecodeOnly:
    """The tokenizer without its Hugging Face object: BatchDetokenizer cannot tell its decoder is byte-level."""

    def __init__(self, tok):
        self.decode, self.decode_batch, self.vocab_size = tok.decode, tok.decode_batch, tok.vocab_size


def step_both(batch, batched, one, items):
    """items: (detokenizer, a token id or None, check_stop), as BatchDetokenizer.add takes them."""
    got = [DetokenizerDelta(text, d.stopped) for text, d in zip(batch.add(items), batched)]
    want = [d.add([] if token is None else [token], check_stop) for d, (_, token, check_stop) in zip(one, items)]
    assert got == want


@pytest.mark.parametrize("byte_level", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_batch_equals_add_one_by_one(tok, batch, seed, byte_level):
    if not byte_level:
        batch = BatchDetokenizer(DecodeOnly(tok))
    rng = np.random.default_rng(seed)
    ids = tok.encode(TEXT)
    pool = sorted(set(ids + tok.all_special_ids))
    prompts = [rng.choice(pool, int(rng.integers(0, 8))).tolist() for _ in OPTIONS]
    one = [IncrementalDetokenizer(tok, p, **o) for p, o in zip(prompts, OPTIONS)]
    batched = [IncrementalDetokenizer(tok, p, **o) for p, o in zip(prompts, OPTIONS)]
    streams = [ids if i % 2 else rng.choice(pool, len(ids)).tolist() for i in range(len(OPTIONS))]
    for step in range(len(ids)):
        step_both(batch, batched, one, [(d, s[step] if rng.random() < 0.9 else None, step > 2)
                                        for d, s in zip(batched, streams)])
    assert [d.finish() for d in batched] == [d.finish() for d in one]
    assert any(d.stopped for d in batched)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batch_equals_add_one_by_one_on_random_streams(tok, batch, token_pool, data):  # noqa: F811
    ids = st.one_of(st.sampled_from(token_pool), st.integers(0, tok.vocab_size + 100))
    prompts = data.draw(st.lists(st.lists(ids, max_size=6), min_size=len(OPTIONS), max_size=len(OPTIONS)))
    one = [IncrementalDetokenizer(tok, p, **o) for p, o in zip(prompts, OPTIONS)]
    batched = [IncrementalDetokenizer(tok, p, **o) for p, o in zip(prompts, OPTIONS)]
    for step in range(data.draw(st.integers(1, 30))):
        tokens = data.draw(st.lists(st.one_of(st.none(), ids), min_size=len(OPTIONS), max_size=len(OPTIONS)))
        step_both(batch, batched, one, [(d, token, step > 1) for d, token in zip(batched, tokens)])
    assert [d.finish() for d in batched] == [d.finish() for d in one]


def test_whole_tokens_need_no_decode(tok):
    """Past the first token, text of whole characters is looked up, not decoded."""
    batch = BatchDetokenizer(tok)
    decoded = []
    tok_decode_batch = tok.decode_batch
    tok_decode = tok.decode
    batch._tokenizer = type("Counting", (), {
        "decode_batch": lambda _, windows, **kw: decoded.extend(windows) or tok_decode_batch(windows, **kw),
        "decode": lambda _, window, **kw: decoded.append(window) or tok_decode(window, **kw)})()
    ids = tok.encode("The quick brown fox jumps over the lazy dog " * 4)
    detoks = [IncrementalDetokenizer(tok, ids[:5]) for _ in range(8)]
    texts = [batch.add([(d, t, True) for d in detoks]) for t in ids]
    assert ["".join(t[i] for t in texts) for i in range(8)] == [tok.decode(ids)] * 8
    assert len(decoded) == 2 * 8  # the first token's windows only


def test_long_streams_are_trimmed_alike(tok, batch):
    ids = tok.encode((TEXT + " " + BROKEN_TEXT + " ") * 30)
    assert len(ids) > 1200
    one = [IncrementalDetokenizer(tok, ids[:3], **o) for o in OPTIONS[:4]]
    batched = [IncrementalDetokenizer(tok, ids[:3], **o) for o in OPTIONS[:4]]
    for token in ids:
        step_both(batch, batched, one, [(d, token, True) for d in batched])
    assert [d.finish() for d in batched] == [d.finish() for d in one]
    assert max(len(d._ids) for d in batched) <= 520
