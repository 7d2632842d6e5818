"""IncrementalDetokenizer on the real SmolLM2 (byte-level BPE) tokenizer: streamed text equals a
whole decode, split multi-byte characters are held back whole, stop strings across tokens."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.serving.detokenizer import REPLACEMENT_CHAR, DetokenizerDelta, IncrementalDetokenizer
from controlplane.serving.tokenizer import load_tokenizer

BROKEN_TEXT = "héllo 😀🎉 世界 こんにちは, naïve café ∑ 𝔘 🇫🇷 done"


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def token_pool(tok):
    """Ids that stress the decoder: every lone byte, byte-level pieces of emoji and CJK
    that are not valid UTF-8 on their own, special tokens and ordinary words."""
    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    lone_bytes, partial = [], []
    for token, token_id in tok.hf.get_vocab().items():
        if any(c not in unicode_to_byte for c in token):
            continue
        raw = bytes(unicode_to_byte[c] for c in token)
        if len(raw) == 1:
            lone_bytes.append(token_id)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial.append(token_id)
    words = tok.encode("The quick brown fox jumps over the lazy dog. STOP here!\n")
    return sorted(set(lone_bytes + partial + tok.all_special_ids + tok.encode(BROKEN_TEXT) + words))


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = []
    for i in range(0, len(ids), chunk):
        delta = detok.add(ids[i:i + chunk])
        deltas.append(delta.text)
        if delta.stopped:
            break
    return deltas


def test_streams_whole_decode_and_holds_split_characters(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something"}])
    ids = tok.encode(BROKEN_TEXT)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = stream(detok, ids)
    assert "".join(deltas) + detok.finish() == BROKEN_TEXT
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "" in deltas  # pieces of a character were held back ...
    assert any("😀" in d for d in deltas)  # ... and came out whole


def test_finish_releases_incomplete_character(tok):
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) == 3
    detok = IncrementalDetokenizer(tok, [])
    assert [d for d in stream(detok, emoji_ids[:2])] == ["", ""]
    assert detok.finish() == tok.decode(emoji_ids[:2]) == REPLACEMENT_CHAR
    assert detok.finish() == ""


def test_skip_special_tokens(tok):
    ids = tok.encode("Hi there") + tok.eos_token_ids
    for skip, expected in [(True, "Hi there"), (False, "Hi there<|im_end|>")]:
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) + detok.finish() == expected


def test_stop_string_spanning_three_tokens(tok):
    ids = tok.encode(" hello big world foo")
    assert tok.convert_ids_to_tokens(ids) == ["Ġhello", "Ġbig", "Ġworld", "Ġfoo"]
    detok = IncrementalDetokenizer(tok, [], stop=["lo big wor"])
    results = [detok.add([i]) for i in ids[:3]]
    assert [(r.text, r.stopped) for r in results] == [(" hel", False), ("", False), ("", True)]
    assert detok.add(ids[3:]).stopped and detok.finish() == ""


def test_stop_string_inside_first_delta(tok):
    ids = tok.encode("Hello STOP world and more")
    detok = IncrementalDetokenizer(tok, [], stop=["world", "STOP"])
    delta = detok.add(ids)  # one add with every token, as after a long first step
    assert (delta.text, delta.stopped) == ("Hello ", True)
    assert detok.stopped


def test_held_back_text_is_released(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["Hello!!", "xyz"])
    assert detok.add(tok.encode("Hello")).text == ""
    assert detok.add(tok.encode("!")).text == ""
    delta = detok.add(tok.encode(" there"))
    assert (delta.text, delta.stopped) == ("Hello! there", False)
    assert detok.add(tok.encode(" x")).text == " "  # "x" could start "xyz"
    assert detok.finish() == "x"


def test_hold_back_is_at_most_longest_stop_minus_one(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["aaaa"])
    assert detok.add(tok.encode("aaa")).text == ""
    assert detok.add(tok.encode(" b")).text == "aaa b"
    detok = IncrementalDetokenizer(tok, [], stop=["ab"])
    assert detok.add(tok.encode("xxxxa")).text == "xxxx"


def test_include_stop_str_in_output_keeps_the_stop_string(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["lo big wor"], include_stop_str_in_output=True)
    text = "".join(stream(detok, tok.encode("Hello big world, and more")))
    assert text == "Hello big wor" and detok.stopped


def test_unchecked_text_is_released_whole_and_never_stops(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP", "ab"])
    delta = detok.add(tok.encode("xx STOP xa"), check_stop=False)  # before min_tokens: no match, nothing held
    assert (delta.text, delta.stopped) == ("xx STOP xa", False)
    assert detok.add(tok.encode(" and STOP"), check_stop=True) == DetokenizerDelta(" and ", True)


def test_decoded_window_stays_small(tok):
    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=False):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    ids = tok.encode(BROKEN_TEXT * 40)
    detok = IncrementalDetokenizer(counting, tok.encode("A prompt of some length " * 20))
    assert "".join(stream(detok, ids)) + detok.finish() == BROKEN_TEXT * 40
    assert counting.longest <= 12


def test_empty_stop_string_is_rejected(tok):
    with pytest.raises(ValueError, match="empty"):
        IncrementalDetokenizer(tok, [], stop=["ok", ""])


@st.composite
def token_ids(draw, pool, max_size):
    return draw(st.lists(st.one_of(st.sampled_from(pool), st.integers(0, 49151)), max_size=max_size))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_equals_whole_decode(tok, token_pool, data):
    prompt = data.draw(token_ids(token_pool, 8), label="prompt")
    completion = data.draw(token_ids(token_pool, 40), label="completion")
    chunk = data.draw(st.integers(1, 4), label="chunk")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = stream(detok, completion, chunk)
    assert "".join(deltas) + detok.finish() == tok.decode(completion, skip_special_tokens=skip)
    assert not detok.stopped


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_stops_at_first_stop_string(tok, token_pool, data):
    completion = data.draw(token_ids(token_pool, 30), label="completion")
    full = tok.decode(completion, skip_special_tokens=True)
    stops = data.draw(st.lists(st.text("abcdeo ", min_size=1, max_size=4), max_size=2), label="random stops")
    if full:
        start = data.draw(st.integers(0, len(full) - 1))
        stops.append(full[start:start + data.draw(st.integers(1, 6))])
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    text = "".join(stream(detok, completion, data.draw(st.integers(1, 3)))) + detok.finish()
    # the stop string complete first when reading char by char; on a tie the longest
    matches = [(i + len(s), i) for s in stops if (i := full.find(s)) >= 0]
    assert detok.stopped == bool(matches)
    assert text == (full[:min(matches)[1]] if matches else full)
