"""Between ``Member`` records and their protobuf form; records from the wire are validated."""

from __future__ import annotations

from collections.abc import Iterable

from lmcache_memkv.control.member import Member, State
from lmcache_memkv.endpoints import parse_endpoint
from lmcache_memkv.proto.memkv.v1 import member_pb2

_MAX_ID = 255
_MAX_TRANSPORTS = 8


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
    return Member(
        node_id=p.node_id,
        incarnation=p.incarnation,
        state=State.from_rank(p.state),  # the proto enum numbers are the ranks
        data_endpoint=p.data_endpoint,
        control_endpoint=p.control_endpoint,
        transports=tuple(p.transports),
        capacity_bytes=p.capacity_bytes,
        used_bytes=p.used_bytes,
    )


def view_to_proto(epoch: int, members: Iterable[Member]) -> member_pb2.View:
    return member_pb2.View(epoch=epoch, members=[member_to_proto(m) for m in members])


def view_from_proto(p: member_pb2.View) -> tuple[int, list[Member]]:
    return p.epoch, [member_from_proto(m) for m in p.members]
