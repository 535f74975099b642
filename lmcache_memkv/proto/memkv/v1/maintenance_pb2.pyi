from lmcache_memkv.proto.memkv.v1 import member_pb2 as _member_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeStats(_message.Message):
    __slots__ = ("capacity_bytes", "used_bytes", "value_bytes", "keys", "leases", "hits", "misses", "hit_ratio", "ops_total", "ops_per_second", "evictions", "evicted_bytes", "leases_granted", "leases_released", "leases_expired", "no_space")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    OPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_GRANTED_FIELD_NUMBER: _ClassVar[int]
    LEASES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    NO_SPACE_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    used_bytes: int
    value_bytes: int
    keys: int
    leases: int
    hits: int
    misses: int
    hit_ratio: float
    ops_total: int
    ops_per_second: float
    evictions: int
    evicted_bytes: int
    leases_granted: int
    leases_released: int
    leases_expired: int
    no_space: int
    def __init__(self, capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., value_bytes: _Optional[int] = ..., keys: _Optional[int] = ..., leases: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_ratio: _Optional[float] = ..., ops_total: _Optional[int] = ..., ops_per_second: _Optional[float] = ..., evictions: _Optional[int] = ..., evicted_bytes: _Optional[int] = ..., leases_granted: _Optional[int] = ..., leases_released: _Optional[int] = ..., leases_expired: _Optional[int] = ..., no_space: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("header", "member", "stats", "version", "uptime_seconds", "protocol_version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    member: _member_pb2.Member
    stats: NodeStats
    version: str
    uptime_seconds: float
    protocol_version: int
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., stats: _Optional[_Union[NodeStats, _Mapping]] = ..., version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class ClusterStatsRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "state", "stats", "error")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: _member_pb2.MemberState
    stats: NodeStats
    error: str
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[_member_pb2.MemberState, str]] = ..., stats: _Optional[_Union[NodeStats, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ClusterStatsResponse(_message.Message):
    __slots__ = ("header", "nodes", "total", "members_up", "members_down")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_UP_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_DOWN_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    total: NodeStats
    members_up: int
    members_down: int
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., total: _Optional[_Union[NodeStats, _Mapping]] = ..., members_up: _Optional[int] = ..., members_down: _Optional[int] = ...) -> None: ...
