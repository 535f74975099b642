from lmcache_memkv.proto.memkv.v1 import member_pb2 as _member_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberListRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class MemberListResponse(_message.Message):
    __slots__ = ("header", "view")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    view: _member_pb2.View
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., view: _Optional[_Union[_member_pb2.View, _Mapping]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("member", "nonce", "cluster_id")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    member: _member_pb2.Member
    nonce: bytes
    cluster_id: str
    def __init__(self, member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., nonce: _Optional[bytes] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("header", "view")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    view: _member_pb2.View
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., view: _Optional[_Union[_member_pb2.View, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "incarnation", "nonce")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    nonce: bytes
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("header", "view")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    view: _member_pb2.View
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., view: _Optional[_Union[_member_pb2.View, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("member", "view", "nonce", "cluster_id")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    member: _member_pb2.Member
    view: _member_pb2.View
    nonce: bytes
    cluster_id: str
    def __init__(self, member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., view: _Optional[_Union[_member_pb2.View, _Mapping]] = ..., nonce: _Optional[bytes] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("header", "member", "view")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    member: _member_pb2.Member
    view: _member_pb2.View
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., view: _Optional[_Union[_member_pb2.View, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("start_epoch", "nonce")
    START_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    start_epoch: int
    nonce: bytes
    def __init__(self, start_epoch: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("header", "view", "keepalive_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_MS_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    view: _member_pb2.View
    keepalive_ms: int
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., view: _Optional[_Union[_member_pb2.View, _Mapping]] = ..., keepalive_ms: _Optional[int] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("member", "target", "gossip", "origin", "nonce", "cluster_id", "epoch", "view_digest")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VIEW_DIGEST_FIELD_NUMBER: _ClassVar[int]
    member: _member_pb2.Member
    target: _member_pb2.Member
    gossip: _containers.RepeatedCompositeFieldContainer[_member_pb2.Member]
    origin: str
    nonce: bytes
    cluster_id: str
    epoch: int
    view_digest: int
    def __init__(self, member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., target: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., gossip: _Optional[_Iterable[_Union[_member_pb2.Member, _Mapping]]] = ..., origin: _Optional[str] = ..., nonce: _Optional[bytes] = ..., cluster_id: _Optional[str] = ..., epoch: _Optional[int] = ..., view_digest: _Optional[int] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("header", "member", "seen", "seen_origin", "gossip", "view_digest")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    SEEN_ORIGIN_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    VIEW_DIGEST_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    member: _member_pb2.Member
    seen: _member_pb2.Member
    seen_origin: _member_pb2.Member
    gossip: _containers.RepeatedCompositeFieldContainer[_member_pb2.Member]
    view_digest: int
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., seen: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., seen_origin: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., gossip: _Optional[_Iterable[_Union[_member_pb2.Member, _Mapping]]] = ..., view_digest: _Optional[int] = ...) -> None: ...

class PingReqRequest(_message.Message):
    __slots__ = ("member", "target", "gossip", "nonce", "cluster_id", "timeout_ms")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    member: _member_pb2.Member
    target: _member_pb2.Member
    gossip: _containers.RepeatedCompositeFieldContainer[_member_pb2.Member]
    nonce: bytes
    cluster_id: str
    timeout_ms: int
    def __init__(self, member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., target: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., gossip: _Optional[_Iterable[_Union[_member_pb2.Member, _Mapping]]] = ..., nonce: _Optional[bytes] = ..., cluster_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class PingReqResponse(_message.Message):
    __slots__ = ("header", "acked", "member", "target", "seen", "gossip")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    acked: bool
    member: _member_pb2.Member
    target: _member_pb2.Member
    seen: _member_pb2.Member
    gossip: _containers.RepeatedCompositeFieldContainer[_member_pb2.Member]
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., acked: bool = ..., member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., target: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., seen: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., gossip: _Optional[_Iterable[_Union[_member_pb2.Member, _Mapping]]] = ...) -> None: ...
