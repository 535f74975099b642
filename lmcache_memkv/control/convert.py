"""Between ``Member`` records and their protobuf form; records from the wire are validated.

Every integer a peer sends is range-checked here before use (ValueError, answered as
INVALID_ARGUMENT), so nothing a peer sends can make this node's own answers fail to encode:

- epochs at most ``MAX_EPOCH`` (2^62): an epoch counts membership changes, so no real cluster
  gets near it, and a node bumping an adopted epoch stays far below 2^64.
- incarnations at most this node's wall clock in ms plus ``INCARNATION_SLACK_MS`` (one hour):
  a node's incarnation is its start time in ms plus one per refuted suspicion, so only a clock
  over an hour ahead (a keyed cluster already needs clocks within 30 s) or a forged record
  exceeds it. Hence every record a node holds is below wall-clock + slack, a refutation
  (+1) never overflows, and a restarted node heals: it refutes any higher record of itself
  by one, which its peers accept, and after the slack its start time outranks it anyway.
- byte and count figures at most ``MAX_FIGURE`` (2^50, 1 PiB) and views at most
  ``MAX_MEMBERS`` members, so sums over a whole view stay below 2^62.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from lmcache_memkv.control.member import Member, State
from lmcache_memkv.endpoints import parse_endpoint
from lmcache_memkv.proto.memkv.v1 import member_pb2

_MAX_ID = 255
_MAX_TRANSPORTS = 8
MAX_EPOCH = 1 << 62
INCARNATION_SLACK_MS = 3_600_000
MAX_FIGURE = 1 << 50
MAX_MEMBERS = 4096


def max_incarnation(now: float | None = None) -> int:
    """The highest incarnation this node accepts now (wall clock in ms plus the slack)."""
    return int((time.time() if now is None else now) * 1000) + INCARNATION_SLACK_MS


def check_epoch(epoch: int, what: str = "view epoch") -> int:
    if not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"{what} {epoch} out of range 0-{MAX_EPOCH}")
    return epoch


def check_incarnation(incarnation: int, what: str, now: float | None = None) -> int:
    limit = max_incarnation(now)
    if not 0 <= incarnation <= limit:
        ahead = (incarnation - limit + INCARNATION_SLACK_MS) / 1000
        raise ValueError(
            f"{what}: incarnation {incarnation} is {ahead:.0f}s ahead of this node's clock "
            f"(at most {INCARNATION_SLACK_MS // 1000}s allowed; check the clocks)"
        )
    return incarnation


def check_figure(value: int, what: str) -> int:
    if not 0 <= value <= MAX_FIGURE:
        raise ValueError(f"{what} {value} out of range 0-{MAX_FIGURE}")
    return value


def check_member(m: Member, now: float | None = None) -> Member:
    """``m`` if every integer in it is in range; else ValueError naming the field."""
    check_incarnation(m.incarnation, f"member {m.node_id}", now)
    if m.data_since > m.incarnation:
        raise ValueError(f"member {m.node_id}: data_since {m.data_since} is after its incarnation {m.incarnation}")
    check_figure(m.capacity_bytes, f"member {m.node_id} capacity_bytes")
    check_figure(m.used_bytes, f"member {m.node_id} used_bytes")
    return m


def state_to_proto(state: State) -> member_pb2.MemberState:
    return member_pb2.MemberState.Value(f"MEMBER_STATE_{state}")


def member_to_proto(m: Member) -> member_pb2.Member:
    return member_pb2.Member(
        node_id=m.node_id,
        incarnation=m.incarnation,
        state=state_to_proto(m.state),
        data_endpoint=m.data_endpoint,
        control_endpoint=m.control_endpoint,
        transports=list(m.transports),
        capacity_bytes=m.capacity_bytes,
        used_bytes=m.used_bytes,
        data_since=m.data_since,
    )


def member_from_proto(p: member_pb2.Member) -> Member:
    """A validated record; ValueError names what is wrong (answered as INVALID_ARGUMENT)."""
    if not p.node_id or len(p.node_id.encode()) > _MAX_ID:
        raise ValueError(f"member node_id must be 1-{_MAX_ID} bytes, got {len(p.node_id.encode())}")
    if p.state == member_pb2.MEMBER_STATE_UNSPECIFIED:
        raise ValueError(f"member {p.node_id}: state is unset")
    parse_endpoint(p.data_endpoint, field=f"member {p.node_id} data_endpoint")
    parse_endpoint(p.control_endpoint, field=f"member {p.node_id} control_endpoint")
    if len(p.transports) > _MAX_TRANSPORTS:
        raise ValueError(f"member {p.node_id}: more than {_MAX_TRANSPORTS} transports")
    return check_member(
        Member(
            node_id=p.node_id,
            incarnation=p.incarnation,
            state=State.from_rank(p.state),  # the proto enum numbers are the ranks
            data_endpoint=p.data_endpoint,
            control_endpoint=p.control_endpoint,
            transports=tuple(p.transports),
            capacity_bytes=p.capacity_bytes,
            used_bytes=p.used_bytes,
            data_since=p.data_since,
        )
    )


def view_to_proto(epoch: int, members: Iterable[Member]) -> member_pb2.View:
    return member_pb2.View(epoch=epoch, members=[member_to_proto(m) for m in members])


def view_from_proto(p: member_pb2.View) -> tuple[int, list[Member]]:
    if len(p.members) > MAX_MEMBERS:
        raise ValueError(f"view of {len(p.members)} members, more than {MAX_MEMBERS}")
    return check_epoch(p.epoch), [member_from_proto(m) for m in p.members]
