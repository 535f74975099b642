"""A cluster member's record and the precedence rules that decide between two records."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(enum.StrEnum):
    """A member's state; a ``str`` so views print and serialise as plain names."""

    ALIVE = "ALIVE"
    SUSPECT = "SUSPECT"
    DEAD = "DEAD"
    LEFT = "LEFT"

    @property
    def rank(self) -> int:
        """Precedence at equal incarnation; equals the proto enum number too."""
        return _RANK[self]

    @classmethod
    def from_rank(cls, rank: int) -> State:
        try:
            return _BY_RANK[rank]
        except KeyError:
            raise ValueError(f"unknown member state {rank}") from None


_RANK = {State.ALIVE: 1, State.SUSPECT: 2, State.DEAD: 3, State.LEFT: 4}
_BY_RANK = {v: k for k, v in _RANK.items()}


@dataclass(frozen=True)
class Member:
    node_id: str
    incarnation: int
    state: State
    data_endpoint: str
    control_endpoint: str
    transports: tuple[str, ...] = field(default=("tcp",))
    capacity_bytes: int = 0
    used_bytes: int = 0
    data_since: int = 0  # incarnation at which this node's data began (start or last wipe)

    @property
    def identity(self) -> tuple[object, ...]:
        """What membership is made of; usage figures change without changing the view's epoch."""
        return (self.node_id, self.incarnation, self.state, self.data_endpoint, self.control_endpoint, self.transports)

    def supersedes(self, other: Member) -> bool:
        """SWIM's rule: a higher incarnation wins; at equal incarnation the graver state wins.

        One exception keeps replicas honest: a DEAD verdict on incarnation i outranks a later
        record of a life whose data began at or before i (a refuted suspicion keeps the data).
        Writers stopped counting the node when it was declared DEAD, so until it wipes and says
        so (a higher data_since) it must stay out of placement.
        """
        if self.state is State.DEAD and other.incarnation > self.incarnation and other.data_since <= self.incarnation:
            return True
        if other.state is State.DEAD and self.incarnation > other.incarnation and self.data_since <= other.incarnation:
            return False
        if self.incarnation != other.incarnation:
            return self.incarnation > other.incarnation
        return self.state.rank > other.state.rank
