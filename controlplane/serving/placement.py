"""Which data plane a new request goes to: `--placement prefix | least-loaded | round-robin`.

A policy sees the data planes that take new work (connected, not drained) as
`PlacementView`s and picks one. Load is the larger of the batch-slot use (requests
held / max_num_seqs) and the KV-cache use, so a plane with long sequences counts as
busy even with few of them.

`prefix` (the default) sends a request where the longest prefix of its tokens is
already cached, as long as that plane is not much busier than the least loaded one:
planes whose load is within PREFIX_LOAD_SLACK of the lowest are candidates; among them
the most cached full blocks win, then the lower load, then turn order. With no prefix
cached anywhere it is least-loaded. Blocks still being computed are not in any cache yet,
so a burst of requests with one new prefix would scatter; the policy also remembers where
it sent each prefix block lately (RECENT_BLOCKS of them) and counts a plane's match there as
cached. The cache is read from the engine threads'
BlockManagers without a lock: a lookup may miss a block registered a moment ago, which
costs a hit, never a wrong token (admission looks the prefix up again on its thread).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from controlplane.core.block_manager import NO_HASH, chain_hash

POLICIES = ("prefix", "least-loaded", "round-robin")
# how much busier (in load, 0..1) than the least loaded plane a plane holding the prefix may be and still get it
PREFIX_LOAD_SLACK = 0.25
RECENT_BLOCKS = 65536  # prefix blocks whose last placement is remembered


@dataclass(slots=True)
class PlacementView:
    """One data plane as placement sees it; `cached_blocks(hashes)` counts the leading hashes it holds."""

    address: str
    load: float
    cached_blocks: Callable[[list[int]], int]


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chain hashes of token_ids' full blocks, as the BlockManager keys them (not the last token's block:
    admission never takes that one from the cache)."""
    hashes, prefix = [], NO_HASH
    for i in range((len(token_ids) - 1) // block_size):
        prefix = chain_hash(token_ids[i * block_size:(i + 1) * block_size], prefix)
        hashes.append(prefix)
    return hashes


def count_cached(hash_to_block_id: dict[int, int], hashes: list[int]) -> int:
    n = 0
    for h in hashes:
        if h not in hash_to_block_id:
            break
        n += 1
    return n


class Placement:
    def __init__(self, policy: str, block_size: int):
        if policy not in POLICIES:
            raise ValueError(f"--placement must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self._turn = itertools.count()
        self._recent: OrderedDict[int, str] = OrderedDict()  # prefix block hash → address it was last sent to

    def choose(self, views: list[PlacementView], token_ids: list[int]) -> tuple[PlacementView, int]:
        """The plane for a request of token_ids, and how many of its full blocks that plane has cached."""
        assert views, "placement needs at least one data plane"
        turn = next(self._turn)
        if self.policy == "round-robin" or len(views) == 1:
            view = views[turn % len(views)]
            return view, 0
        # the turn breaks ties, so equal planes take turns rather than the first taking everything
        order = {id(v): (i - turn) % len(views) for i, v in enumerate(views)}
        if self.policy == "least-loaded":
            return min(views, key=lambda v: (v.load, order[id(v)])), 0
        hashes = prefix_hashes(token_ids, self.block_size)
        lowest = min(v.load for v in views)
        candidates = [v for v in views if v.load <= lowest + PREFIX_LOAD_SLACK]
        cached = {id(v): max(v.cached_blocks(hashes), self._recently_sent(v.address, hashes)) if hashes else 0
                  for v in candidates}
        view = min(candidates, key=lambda v: (-cached[id(v)], v.load, order[id(v)]))
        for h in hashes:
            self._recent[h] = view.address
            self._recent.move_to_end(h)
        while len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)
        return view, cached[id(view)]

    def _recently_sent(self, address: str, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if self._recent.get(h) != address:
                break
            n += 1
        return n
