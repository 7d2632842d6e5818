"""detokenizer.add_batch (one batch decode per step for many sequences) gives exactly the deltas of
IncrementalDetokenizer.add per sequence, with stop strings, min_tokens (check_stop off), special
tokens shown or skipped, multi-byte characters split across tokens, and sequences that stopped."""
import numpy as np
import pytest

from controlplane.detokenizer import IncrementalDetokenizer, add_batch
from controlplane.tokenizer import load_tokenizer

TEXT = "The quick brown fox 😀 jumps over 世界, naïve café. STOP here!\nAnd the lazy dog sleeps."


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.mark.parametrize("seed", range(4))
def test_add_batch_equals_add_one_by_one(tok, seed):
    rng = np.random.default_rng(seed)
    ids = tok.encode(TEXT)
    pool = sorted(set(ids + tok.all_special_ids))
    options = [dict(), dict(stop=["STOP"]), dict(stop=["dog", "ee"], include_stop_str_in_output=True),
               dict(skip_special_tokens=False), dict(skip_special_tokens=False, stop=["é"])]
    prompts = [rng.choice(pool, int(rng.integers(0, 8))).tolist() for _ in options]
    one = [IncrementalDetokenizer(tok, p, **o) for p, o in zip(prompts, options)]
    batched = [IncrementalDetokenizer(tok, p, **o) for p, o in zip(prompts, options)]
    streams = [ids if i % 2 else rng.choice(pool, len(ids)).tolist() for i in range(len(options))]
    for step in range(len(ids)):
        items = [(d, [s[step]] if rng.random() < 0.9 else [], step > 2) for d, s in zip(batched, streams)]
        got = add_batch(tok, items)
        want = [d.add(token_ids, check_stop) for d, (_, token_ids, check_stop) in zip(one, items)]
        assert got == want
    assert [d.finish() for d in batched] == [d.finish() for d in one]
    assert any(d.stopped for d in batched)
