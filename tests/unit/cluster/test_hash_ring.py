"""The consistent-hash ring behind session affinity."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.hash_ring import HashRing

SESSIONS = [f"sess-{i}" for i in range(2000)]


def test_a_key_maps_to_the_same_member_every_time_and_in_every_ring_built_alike():
    a, b = HashRing(["r1", "r2", "r3"]), HashRing(["r3", "r1", "r2"])
    assert [a.lookup(s)[0] for s in SESSIONS] == [b.lookup(s)[0] for s in SESSIONS]


def test_keys_spread_over_the_members():
    owners = Counter(HashRing(["r1", "r2", "r3", "r4"]).lookup(s)[0] for s in SESSIONS)
    assert set(owners) == {"r1", "r2", "r3", "r4"}
    assert min(owners.values()) > len(SESSIONS) / 4 * 0.6, owners


def test_removing_a_member_moves_only_its_own_keys():
    ring = HashRing(["r1", "r2", "r3", "r4"])
    before = {s: ring.lookup(s)[0] for s in SESSIONS}
    assert ring.update(["r1", "r2", "r4"])
    after = {s: ring.lookup(s)[0] for s in SESSIONS}
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert moved and all(before[s] == "r3" for s in moved)
    # a removed member's keys go to the next member clockwise: the second choice before
    assert all(after[s] == HashRing(["r1", "r2", "r3", "r4"]).lookup(s, 2)[1] for s in moved)


def test_lookup_lists_distinct_members_in_ring_order():
    ring = HashRing(["r1", "r2", "r3"])
    ranked = ring.lookup("sess-7", 5)
    assert sorted(ranked) == ["r1", "r2", "r3"]
    assert ring.lookup("sess-7", 1) == ranked[:1]
    assert HashRing().lookup("sess-7") == []


def test_an_unchanged_member_set_is_not_rebuilt_and_bad_sizes_are_refused():
    ring = HashRing(["r1"])
    assert ring.update(["r1"]) is False
    with pytest.raises(ValueError, match="virtual_nodes=0"):
        HashRing(virtual_nodes=0)
