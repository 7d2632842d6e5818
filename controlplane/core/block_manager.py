"""KV-cache block accounting: a fixed pool of blocks, ref counts and an xxhash prefix cache.

Nano-vLLM's design. Each full block is identified by xxhash64 over (hash of the previous
block, its token ids as int32); `hash_to_block_id` maps that chain hash to the block
holding those tokens. A freed block keeps its hash and tokens, so it stays a cache hit
until it is handed out again. The Scheduler calls this module; the data plane never
sees it, only the block ids it hands out.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from controlplane.core.sequence import Sequence

NO_HASH = -1


def chain_hash(token_ids: list[int], prefix_hash: int = NO_HASH) -> int:
    h = xxhash.xxh64()
    if prefix_hash != NO_HASH:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype="<i4").tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._new_pool(num_blocks)

    def _new_pool(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Per block id, in lists rather than an object per block: a pool of 100k blocks is then a
        # few objects for the garbage collector to walk instead of 100k (a full pass took ~100 ms).
        self.ref_counts = [0] * num_blocks
        self.block_hashes = [NO_HASH] * num_blocks  # kept when freed: a cache hit until handed out again
        self.block_token_ids: list[tuple[int, ...]] = [()] * num_blocks  # the tokens a hashed block holds
        self.hash_to_block_id: dict[int, int] = {}
        # Free blocks, oldest-freed first. An OrderedDict rather than Nano-vLLM's deque:
        # a prefix-cache hit takes a free block out of the middle, O(1) here.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    def reset(self, num_blocks: int | None = None) -> None:
        """Forgets every block's contents, the prefix cache with them, and takes num_blocks as the new pool size.

        For a data plane that lost its KV cache (a new Step stream, maybe a new process):
        a cached hash would point at KV that is gone. Only valid with no block in use.
        """
        in_use = self.num_blocks - len(self.free_block_ids)
        assert in_use == 0, f"reset with {in_use} blocks still in use"
        self._new_pool(num_blocks or self.num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_prefix(self, seq: Sequence) -> int:
        """Gives seq the longest chain of cached full blocks of its tokens; returns the tokens they hold.

        The block holding the last token is never taken from the cache: that token must be
        computed so the data plane has logits to sample from.
        """
        assert not seq.block_table, f"{seq.seq_id} already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        prefix_hash = NO_HASH
        for i in range((seq.num_tokens - 1) // bs):
            token_ids = seq.token_ids[i * bs:(i + 1) * bs]
            prefix_hash = chain_hash(token_ids, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash)
            # comparing the tokens guards against a hash collision
            if block_id is None or self.block_token_ids[block_id] != tuple(token_ids):
                break
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        return len(seq.block_table) * bs

    def ensure_slots(self, seq: Sequence, num_tokens_after: int) -> bool:
        """Appends free blocks so seq's table covers num_tokens_after tokens; False, changing nothing, if short."""
        needed = self.num_blocks_for(num_tokens_after) - len(seq.block_table)
        if needed > len(self.free_block_ids):
            return False
        for _ in range(needed):
            block_id, _ = self.free_block_ids.popitem(last=False)
            old_hash = self.block_hashes[block_id]
            if old_hash != NO_HASH:
                if self.hash_to_block_id.get(old_hash) == block_id:
                    del self.hash_to_block_id[old_hash]  # its old contents are about to be overwritten
                self.block_hashes[block_id] = NO_HASH
                self.block_token_ids[block_id] = ()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        return True

    def register_full_blocks(self, seq: Sequence, num_tokens_known: int) -> None:
        """Registers in the prefix cache every block of seq that is full within its first num_tokens_known tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(num_tokens_known // bs, len(seq.block_table))
        # Hashed blocks always form a prefix of the table (cache hits, then blocks registered
        # in order), so walk back from the last full block to the first already hashed.
        table, hashes = seq.block_table, self.block_hashes
        first = num_full
        while first > 0 and hashes[table[first - 1]] == NO_HASH:
            first -= 1
        prefix_hash = hashes[table[first - 1]] if first else NO_HASH
        for i in range(first, num_full):
            token_ids = seq.token_ids[i * bs:(i + 1) * bs]
            prefix_hash = chain_hash(token_ids, prefix_hash)
            block_id = table[i]
            hashes[block_id] = prefix_hash
            self.block_token_ids[block_id] = tuple(token_ids)
            self.hash_to_block_id[prefix_hash] = block_id

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Frees seq's trailing blocks past its first num_tokens tokens (rejected speculative drafts'). They
        were appended by ensure_slots for positions past the known tokens: unshared, never hashed."""
        keep = self.num_blocks_for(num_tokens)
        table = seq.block_table
        while len(table) > keep:
            block_id = table.pop()
            assert self.ref_counts[block_id] == 1 and self.block_hashes[block_id] == NO_HASH, block_id
            self.ref_counts[block_id] = 0
            self.free_block_ids[block_id] = None

    def free(self, seq: Sequence) -> None:
        """Drops seq's references, last block first so its unshared tail is reused before a shared prefix."""
        if not seq.block_table:
            raise RuntimeError(f"free of {seq.seq_id}: it holds no blocks (double free?)")
        ref_counts = self.ref_counts
        for block_id in seq.block_table:
            if ref_counts[block_id] <= 0:
                raise RuntimeError(f"free of {seq.seq_id}: block {block_id} is already free")
        for block_id in reversed(seq.block_table):
            ref_counts[block_id] -= 1
            if ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
        seq.block_table.clear()

    def check_invariants(self, block_tables: list[list[int]] | None = None) -> None:
        """Raises AssertionError when the pool is inconsistent; with block_tables (all live
        sequences' tables), also checks every ref count equals the number of references."""
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "duplicate block on the free list"
        assert free <= set(range(self.num_blocks)), "unknown block id on the free list"
        assert len(self.ref_counts) == len(self.block_hashes) == len(self.block_token_ids) == self.num_blocks
        for block_id, ref_count in enumerate(self.ref_counts):
            assert ref_count >= 0, f"block {block_id} has ref count {ref_count}"
            assert (ref_count == 0) == (block_id in free), (
                f"block {block_id}: ref count {ref_count}, on free list {block_id in free}")
        for h, block_id in self.hash_to_block_id.items():
            assert self.block_hashes[block_id] == h, f"hash map points to block {block_id} holding another hash"
        if block_tables is not None:
            refs = np.bincount(np.fromiter((b for t in block_tables for b in t), dtype=np.int64),
                               minlength=self.num_blocks)
            want = np.array(self.ref_counts)
            bad = np.flatnonzero(refs != want)
            assert len(bad) == 0, f"block {bad[0]}: {refs[bad[0]]} references, ref count {want[bad[0]]}"
