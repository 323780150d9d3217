"""Prefix-affinity routing, pure: longest cached prefix wins, balance wins when uneven,
conversations stick, a replica that goes away is forgotten."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ragcache.affinity import AffinityRouter, AffinitySettings, Segment


def request(*chunks: str, system: str = "sys", question: str = "q") -> list[Segment]:
    return [
        Segment(f"system:{system}", 50),
        *(Segment(f"chunk:{c}", 200) for c in chunks),
        Segment(f"question:{question}", 20),
    ]


def test_the_replica_that_holds_the_longest_prefix_gets_the_request() -> None:
    router = AffinityRouter(["r0", "r1", "r2"])
    first = router.route(request("A", "B", question="1"))
    other = router.route(request("C", "D", question="2"), loads={first.replica: 1})
    assert other.replica != first.replica  # nothing shared: the idlest
    again = router.route(request("A", "B", "E", question="3"))
    assert again.replica == first.replica and again.reason == "affinity"
    assert again.matched_tokens == 50 + 200 + 200
    assert router.route(request("C", "D", "F")).replica == other.replica
    # sharing only the system prompt (every replica's) is no affinity: the least loaded
    lone = router.route(request("Z", question="4"), loads={first.replica: 1, other.replica: 1})
    assert lone.reason == "least-loaded" and lone.replica not in (first.replica, other.replica)


def test_balance_wins_over_affinity_when_the_replicas_are_uneven() -> None:
    router = AffinityRouter(["r0", "r1"], AffinitySettings(balance_abs=2, balance_rel=1.5))
    home = router.route(request("A")).replica
    away = "r1" if home == "r0" else "r0"
    assert router.route(request("A"), loads={home: 2, away: 0}).replica == home  # within bounds
    got = router.route(request("A"), loads={home: 6, away: 1})
    assert got.replica == away and got.reason == "balance"


def test_a_conversation_sticks_to_its_replica_until_it_goes_away() -> None:
    router = AffinityRouter(["r0", "r1"])
    first = router.route(request("A"), conversation="c1")
    for i in range(3):  # later turns retrieve other chunks: still the same replica
        turn = router.route(request("X", str(i)), conversation="c1")
        assert turn.replica == first.replica and turn.reason == "sticky"
    router.remove_replica(first.replica)
    moved = router.route(request("X"), conversation="c1")
    assert moved.replica != first.replica and moved.replica in router.names


def test_the_router_forgets_what_no_longer_fits_its_budget() -> None:
    router = AffinityRouter(["r0"], AffinitySettings(tokens_per_replica=1000))
    router.route(request("A", "B"))
    assert router.matched_tokens("r0", request("A", "B")) == 470  # the same question too
    for i in range(10):
        router.route(request(f"N{i}", f"M{i}", system=f"s{i}"))
    assert router.matched_tokens("r0", request("A", "B")) == 0


@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from("ABCDEFGH"), min_size=0, max_size=5),
            st.dictionaries(st.sampled_from(["r0", "r1", "r2"]), st.integers(0, 20)),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_every_decision_is_a_live_replica_and_never_claims_more_than_the_request(
    stream: list[tuple[list[str], dict[str, int]]],
) -> None:
    router = AffinityRouter(["r0", "r1", "r2"], AffinitySettings(tokens_per_replica=3000))
    for chunks, loads in stream:
        segments = request(*chunks)
        decision = router.route(segments, loads)
        assert decision.replica in router.names
        assert 0 <= decision.matched_tokens <= sum(s.tokens for s in segments)
        # what was just routed there is now matched in full (it fits the budget)
        assert router.matched_tokens(decision.replica, segments) == sum(s.tokens for s in segments)


def test_a_shared_system_prompt_is_no_affinity_however_large_its_share() -> None:
    # A long system prompt with short chunks: 80% of the tokens match on any replica holding it.
    def short(chunk: str) -> list[Segment]:
        return [Segment("system:big", 400, shared=True), Segment(f"chunk:{chunk}", 100)]

    router = AffinityRouter(["r0", "r1"])
    first = router.route(short("A"))
    second = router.route(short("B"))
    assert second.replica != first.replica and second.reason == "least-loaded"
    assert router.route(short("A")).replica == first.replica  # its own chunk: affinity


def test_prompt_segments_key_each_segment_by_its_tokens_and_mark_the_system_one_shared() -> None:
    from ragcache.affinity import prompt_segments

    a = prompt_segments([1, 2, 3, 4, 5, 6], [2, 4, 6], ["system", "chunk", "question"])
    b = prompt_segments([1, 2, 9, 9, 3, 4], [2, 4, 6], ["system", "chunk", "chunk"])
    assert [s.tokens for s in a] == [2, 2, 2] and [s.shared for s in a] == [True, False, False]
    assert a[0].key == b[0].key and a[1].key == b[2].key  # same ids, same key
    assert a[1].key != b[1].key
