"""TurnSet: set semantics whatever the order turns are added in, compact when in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.transcript.turn_set import TurnSet


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), max_size=200))
def test_behaves_as_a_set(adds: list[tuple[int, int]]) -> None:
    turns, plain = TurnSet(), set()
    for stream, order in adds:
        assert turns.add(stream, order) == ((stream, order) not in plain)
        plain.add((stream, order))
        assert len(turns) == len(plain)
    for stream in range(4):
        for order in range(45):
            assert turns.contains(stream, order) == ((stream, order) in plain)


def test_in_order_turns_keep_nothing_one_by_one() -> None:
    turns = TurnSet()
    for order in range(10_000):
        turns.add((0, 0), order)
        turns.add((1, 0), order)
    assert len(turns) == 20_000 and turns.loose == 0
    # A turn held back (finalized after the next one) is loose only until it is added.
    turns.add((0, 1), 1)
    assert turns.loose == 1 and not turns.contains((0, 1), 0)
    turns.add((0, 1), 0)
    assert turns.loose == 0 and turns.contains((0, 1), 1)


def test_negative_orders_are_refused() -> None:
    turns = TurnSet()
    with pytest.raises(ValueError, match="negative"):
        turns.add("s", -1)
    assert not turns.contains("s", -1)
