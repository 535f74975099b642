from lmcache_memkv.proto.memkv.v1 import member_pb2 as _member_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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
    __slots__ = ("member", "nonce")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    member: _member_pb2.Member
    nonce: bytes
    def __init__(self, member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., nonce: _Optional[bytes] = ...) -> None: ...

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
    __slots__ = ("member", "view", "nonce")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    member: _member_pb2.Member
    view: _member_pb2.View
    nonce: bytes
    def __init__(self, member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., view: _Optional[_Union[_member_pb2.View, _Mapping]] = ..., nonce: _Optional[bytes] = ...) -> None: ...

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
