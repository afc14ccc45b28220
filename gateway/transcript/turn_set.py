"""TurnSet: which turns of a call are final, in memory that does not grow with the call.

Every STT session numbers its turns 0, 1, 2, ... and finalizes them almost always in that order
(the v3 client may hold one back briefly for its formatted twin). So per stream -- a channel's
session, ``(channel, epoch)`` -- the set keeps a floor below which every turn is a member, and
only the few members above the floor one by one. A set of Python keys cost about 100 bytes a
final turn, which a long call kept once per consumer (merger, event log, v3 turn tracker).

Sans-I/O, no dependencies. Turn orders below 0 are refused (no engine produces them).
"""

from __future__ import annotations

from collections.abc import Hashable


class TurnSet:
    """A set of ``(stream, turn_order)`` pairs, compact while each stream's turns are added
    mostly in order (see module docstring). ``add`` and ``contains`` are O(1) amortized."""

    __slots__ = ("_floors", "_above", "_len")

    def __init__(self) -> None:
        self._floors: dict[Hashable, int] = {}  # every order < floor is a member
        self._above: dict[Hashable, set[int]] = {}  # members > floor, only while there are any
        self._len = 0

    def add(self, stream: Hashable, order: int) -> bool:
        """Add a turn; True if it was not a member yet. Raises ValueError for ``order`` < 0."""
        if order < 0:
            raise ValueError(f"turn order {order} is negative")
        floor = self._floors.get(stream, 0)
        if order < floor:
            return False
        above = self._above.get(stream)
        if order == floor:
            floor += 1
            if above is not None:
                while floor in above:  # a turn held back earlier closes the gap
                    above.discard(floor)
                    floor += 1
                if not above:
                    del self._above[stream]
            self._floors[stream] = floor
        elif above is None:
            self._above[stream] = {order}
        elif order in above:
            return False
        else:
            above.add(order)
        self._len += 1
        return True

    def contains(self, stream: Hashable, order: int) -> bool:
        if order < self._floors.get(stream, 0):
            return order >= 0
        above = self._above.get(stream)
        return above is not None and order in above

    def __len__(self) -> int:
        return self._len

    @property
    def loose(self) -> int:
        """Members kept one by one (above their stream's floor): the part that costs memory."""
        return sum(len(s) for s in self._above.values())
