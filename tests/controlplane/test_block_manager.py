"""BlockManager: allocation, ref counts, the xxhash prefix cache and its last-token rule."""
import pytest

from controlplane.core.block_manager import BlockManager
from controlplane.core.sequence import SamplingOptions, Sequence

BS = 4


def make_seq(token_ids, seq_id="s"):
    return Sequence(seq_id, list(token_ids), SamplingOptions(max_tokens=8))


def admit(bm: BlockManager, seq: Sequence) -> int:
    """What the scheduler does for a whole prompt: prefix hit, blocks for the rest, register full blocks."""
    cached = bm.allocate_prefix(seq)
    assert bm.ensure_slots(seq, seq.num_tokens)
    bm.register_full_blocks(seq, seq.num_tokens)
    return cached


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(10))
    assert bm.allocate_prefix(seq) == 0
    assert bm.ensure_slots(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.ensure_slots(seq, 12) and len(seq.block_table) == 3  # still within the third block
    assert bm.ensure_slots(seq, 13) and len(seq.block_table) == 4
    bm.check_invariants([seq.block_table])
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_ensure_slots_changes_nothing_when_short():
    bm = BlockManager(num_blocks=3, block_size=BS)
    seq = make_seq(range(8))
    assert bm.ensure_slots(seq, 8)
    assert not bm.ensure_slots(seq, 17)  # needs 5 blocks, 3 exist
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 1
    assert not bm.can_allocate(2) and bm.can_allocate(1)


def test_common_prefix_is_shared_and_survives_free_until_reallocated():
    bm = BlockManager(num_blocks=12, block_size=BS)
    prefix = list(range(100, 112))  # 3 full blocks
    a = make_seq(prefix + [1, 2], "a")
    b = make_seq(prefix + [3, 4, 5], "b")
    assert admit(bm, a) == 0
    assert admit(bm, b) == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    shared = a.block_table[:3]
    assert [bm.ref_counts[i] for i in shared] == [2, 2, 2]
    bm.check_invariants([a.block_table, b.block_table])

    bm.free(a)
    assert [bm.ref_counts[i] for i in shared] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 12
    bm.check_invariants([])

    c = make_seq(prefix + [9], "c")
    assert admit(bm, c) == 12 and c.block_table[:3] == shared
    bm.free(c)

    # take every block: the cached ones are handed out again and leave the cache
    hog = make_seq(range(12 * BS), "hog")
    assert bm.ensure_slots(hog, hog.num_tokens)
    bm.free(hog)
    d = make_seq(prefix + [9], "d")
    assert bm.allocate_prefix(d) == 0
    bm.check_invariants([d.block_table])


def test_cached_blocks_are_taken_back_off_the_free_list():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(9), "a")
    admit(bm, a)
    bm.free(a)
    b = make_seq(range(9), "b")
    assert bm.allocate_prefix(b) == 8
    assert bm.num_free_blocks == 2
    bm.check_invariants([b.block_table])


def test_last_token_block_is_never_a_cache_hit():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admit(bm, make_seq(range(8), "a"))  # two full blocks, both registered
    assert bm.allocate_prefix(make_seq(range(8), "b")) == 4  # the second holds the last token
    assert bm.allocate_prefix(make_seq(range(9), "c")) == 8


def test_hash_chains_over_the_prefix():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admit(bm, make_seq([1, 1, 1, 1, 2, 2, 2, 2, 0], "a"))
    # the same second block after a different first block is not a hit
    assert bm.allocate_prefix(make_seq([3, 3, 3, 3, 2, 2, 2, 2, 0], "b")) == 0


def test_register_counts_only_full_blocks_within_known_tokens():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(13), "a")
    bm.ensure_slots(a, 13)
    bm.register_full_blocks(a, 6)  # a chunk of 6: only block 0 is full
    assert bm.allocate_prefix(make_seq(range(13), "b")) == 4
    bm.register_full_blocks(a, 13)
    assert bm.allocate_prefix(make_seq(range(13), "c")) == 12


def test_double_free_raises():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(range(5))
    bm.ensure_slots(seq, 5)
    bm.free(seq)
    with pytest.raises(RuntimeError):
        bm.free(seq)
    alias = make_seq(range(5), "alias")
    alias.block_table = [0]  # a table copied from a freed sequence
    with pytest.raises(RuntimeError):
        bm.free(alias)
    bm.check_invariants([])


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(bm, make_seq(range(9), "a"))
    assert bm.allocate_prefix(make_seq(range(9), "b")) == 0
    assert bm.hash_to_block_id == {}
