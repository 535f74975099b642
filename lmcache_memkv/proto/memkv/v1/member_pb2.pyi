from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_STATE_UNSPECIFIED: _ClassVar[MemberState]
    MEMBER_STATE_ALIVE: _ClassVar[MemberState]
    MEMBER_STATE_SUSPECT: _ClassVar[MemberState]
    MEMBER_STATE_DEAD: _ClassVar[MemberState]
    MEMBER_STATE_LEFT: _ClassVar[MemberState]
MEMBER_STATE_UNSPECIFIED: MemberState
MEMBER_STATE_ALIVE: MemberState
MEMBER_STATE_SUSPECT: MemberState
MEMBER_STATE_DEAD: MemberState
MEMBER_STATE_LEFT: MemberState

class Member(_message.Message):
    __slots__ = ("node_id", "incarnation", "state", "data_endpoint", "control_endpoint", "transports", "capacity_bytes", "used_bytes", "data_since")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DATA_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_SINCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    state: MemberState
    data_endpoint: str
    control_endpoint: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    capacity_bytes: int
    used_bytes: int
    data_since: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., data_endpoint: _Optional[str] = ..., control_endpoint: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., data_since: _Optional[int] = ...) -> None: ...

class View(_message.Message):
    __slots__ = ("epoch", "members")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, epoch: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class ResponseHeader(_message.Message):
    __slots__ = ("node_id", "epoch", "proof", "cluster_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    proof: bytes
    cluster_id: str
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., proof: _Optional[bytes] = ..., cluster_id: _Optional[str] = ...) -> None: ...
