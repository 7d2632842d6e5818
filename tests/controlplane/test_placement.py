"""Placement policies on PlacementViews: round-robin takes turns, least-loaded takes the idlest plane, prefix takes
the plane holding the longest cached prefix unless it is more than PREFIX_LOAD_SLACK busier than the idlest."""
import pytest

from controlplane.serving.placement import PREFIX_LOAD_SLACK, Placement, PlacementView, count_cached, prefix_hashes

BLOCK = 4


def view(address: str, load: float = 0.0, cached: dict[int, int] | None = None) -> PlacementView:
    index = cached or {}
    return PlacementView(address, load, lambda hashes: count_cached(index, hashes))


def cache_of(token_ids: list[int], num_blocks: int) -> dict[int, int]:
    """A BlockManager's hash index holding the first num_blocks full blocks of token_ids."""
    return {h: i for i, h in enumerate(prefix_hashes(token_ids, BLOCK)[:num_blocks])}


def test_round_robin_takes_turns_whatever_the_load_or_cache():
    prompt = list(range(20))
    views = [view("a", 0.9, cache_of(prompt, 4)), view("b"), view("c")]
    placement = Placement("round-robin", BLOCK)
    assert [placement.choose(views, prompt)[0].address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_takes_the_idlest_and_equal_planes_take_turns():
    placement = Placement("least-loaded", BLOCK)
    assert placement.choose([view("a", 0.5), view("b", 0.1), view("c", 0.3)], [1, 2, 3])[0].address == "b"
    equal = [view("a"), view("b")]
    assert {placement.choose(equal, [1])[0].address for _ in range(2)} == {"a", "b"}


def test_prefix_goes_where_the_longest_prefix_is_cached():
    prompt = list(range(17))  # 4 full blocks; the last token's block is never taken from the cache
    assert len(prefix_hashes(prompt, BLOCK)) == 4
    views = [view("a", 0.0, cache_of(prompt, 1)), view("b", 0.1, cache_of(prompt, 3)), view("c")]
    chosen, num_cached = Placement("prefix", BLOCK).choose(views, prompt)
    assert (chosen.address, num_cached) == ("b", 3)


def test_prefix_gives_way_to_load_beyond_the_slack():
    prompt = list(range(17))
    busy = view("busy", PREFIX_LOAD_SLACK + 0.2, cache_of(prompt, 4))
    chosen, num_cached = Placement("prefix", BLOCK).choose([busy, view("idle", 0.1)], prompt)
    assert (chosen.address, num_cached) == ("idle", 0)


def test_prefix_keeps_a_burst_of_one_new_prefix_together():
    """Blocks still being computed are in no cache yet: the placements just made count as cached."""
    placement = Placement("prefix", BLOCK)
    views = [view("a"), view("b"), view("c")]
    shared = list(range(100, 116))
    chosen = [placement.choose(views, shared + [i, i + 1, i + 2, i + 3, i + 4])[0].address for i in range(6)]
    assert len(set(chosen)) == 1
    # a prompt with no full block has nothing to share: it goes by load and turn
    assert {placement.choose(views, [7])[0].address for _ in range(3)} == {"a", "b", "c"}


def test_an_unknown_policy_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="prefix, least-loaded, round-robin"):
        Placement("random", BLOCK)
