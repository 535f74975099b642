from lmcache_memkv.proto.memkv.v1 import member_pb2 as _member_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RdmaEndpoint(_message.Message):
    __slots__ = ("lid", "gid", "qp_num", "psn", "mtu", "gid_index")
    LID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    QP_NUM_FIELD_NUMBER: _ClassVar[int]
    PSN_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    GID_INDEX_FIELD_NUMBER: _ClassVar[int]
    lid: int
    gid: bytes
    qp_num: int
    psn: int
    mtu: int
    gid_index: int
    def __init__(self, lid: _Optional[int] = ..., gid: _Optional[bytes] = ..., qp_num: _Optional[int] = ..., psn: _Optional[int] = ..., mtu: _Optional[int] = ..., gid_index: _Optional[int] = ...) -> None: ...

class MemoryRegion(_message.Message):
    __slots__ = ("addr", "length", "rkey")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    RKEY_FIELD_NUMBER: _ClassVar[int]
    addr: int
    length: int
    rkey: int
    def __init__(self, addr: _Optional[int] = ..., length: _Optional[int] = ..., rkey: _Optional[int] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("client_id", "protocol_version", "transports", "client_nonce", "rdma_endpoint", "memory_regions")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    RDMA_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REGIONS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    protocol_version: int
    transports: _containers.RepeatedScalarFieldContainer[str]
    client_nonce: bytes
    rdma_endpoint: RdmaEndpoint
    memory_regions: _containers.RepeatedCompositeFieldContainer[MemoryRegion]
    def __init__(self, client_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., transports: _Optional[_Iterable[str]] = ..., client_nonce: _Optional[bytes] = ..., rdma_endpoint: _Optional[_Union[RdmaEndpoint, _Mapping]] = ..., memory_regions: _Optional[_Iterable[_Union[MemoryRegion, _Mapping]]] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("header", "protocol_version", "transport", "data_endpoint", "server_proof", "rdma_endpoint", "memory_regions", "session_id")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    DATA_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SERVER_PROOF_FIELD_NUMBER: _ClassVar[int]
    RDMA_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REGIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    header: _member_pb2.ResponseHeader
    protocol_version: int
    transport: str
    data_endpoint: str
    server_proof: bytes
    rdma_endpoint: RdmaEndpoint
    memory_regions: _containers.RepeatedCompositeFieldContainer[MemoryRegion]
    session_id: int
    def __init__(self, header: _Optional[_Union[_member_pb2.ResponseHeader, _Mapping]] = ..., protocol_version: _Optional[int] = ..., transport: _Optional[str] = ..., data_endpoint: _Optional[str] = ..., server_proof: _Optional[bytes] = ..., rdma_endpoint: _Optional[_Union[RdmaEndpoint, _Mapping]] = ..., memory_regions: _Optional[_Iterable[_Union[MemoryRegion, _Mapping]]] = ..., session_id: _Optional[int] = ...) -> None: ...
