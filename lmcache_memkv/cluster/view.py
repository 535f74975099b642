"""An immutable snapshot of the cluster view as a client holds it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lmcache_memkv.cluster.hrw import node_salt, rank_salted
from lmcache_memkv.control.member import Member, State


@dataclass(frozen=True)
class ClusterView:
    epoch: int = 0
    members: Mapping[str, Member] = field(default_factory=lambda: MappingProxyType({}))
    alive: tuple[str, ...] = ()
    # Placement is over ALIVE and SUSPECT members: a suspicion may be refuted, and a member that
    # left placement while suspected would come back holding values overwritten meanwhile.
    placeable: tuple[str, ...] = ()
    salted: tuple[tuple[str, bytes], ...] = ()  # (node_id, node_salt) of the placeable members, for HRW

    @classmethod
    def build(cls, epoch: int, members: Iterable[Member]) -> ClusterView:
        by_id = {m.node_id: m for m in sorted(members, key=lambda m: m.node_id)}
        alive = tuple(n for n, m in by_id.items() if m.state is State.ALIVE)
        placeable = tuple(n for n, m in by_id.items() if m.state in (State.ALIVE, State.SUSPECT))
        salted = tuple((n, node_salt(n)) for n in placeable)
        return cls(epoch=epoch, members=MappingProxyType(by_id), alive=alive, placeable=placeable, salted=salted)

    def placement(self, key: bytes) -> list[str]:
        """ALIVE and SUSPECT node ids, best first for ``key``."""
        return rank_salted(self.salted, key)

    def same_membership(self, members: Iterable[Member]) -> bool:
        return {m.identity for m in self.members.values()} == {m.identity for m in members}
