"""Message types and their meta encodings (pure functions, no I/O)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import ClassVar

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, MAX_RKEY, NONCE_LEN, RESPONSE_BIT, ErrorCode, Op, Status
from lmcache_memkv.wire.frames import MAX_REQUEST_ID, Header, encode_header
from lmcache_memkv.wire.limits import Limits

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
# Per key of GET responses: status, length, version; of EXISTS: the same plus a lease id.
_RECORDS = {2: struct.Struct("!BQQ"), 3: struct.Struct("!BQQQ")}
_STATUS = {s.value: s for s in Status}
_STATUS_BY_CODE = tuple(_STATUS[i] for i in range(max(_STATUS) + 1))


def _statuses(codes: bytes | tuple[int, ...]) -> list[Status]:
    """Status codes to Status members (a C-level map); an unknown code is a ProtocolError."""
    try:
        return list(map(_STATUS_BY_CODE.__getitem__, codes))
    except IndexError:
        bad = next(c for c in codes if c >= len(_STATUS_BY_CODE))
        raise ProtocolError(f"unknown status code {bad}", ErrorCode.BAD_FRAME) from None
_MAX_ERROR_MESSAGE = 4096


class _Reader:
    """Bounds-checked cursor over a meta buffer; every overrun is a ProtocolError."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data)
        self._bytes = bytes(data)  # meta only (keys, sizes): small, and bytes slice fastest
        self._pos = 0

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._data):
            raise ProtocolError(
                f"truncated meta: needed {n} bytes at offset {self._pos}, only {len(self._data) - self._pos} left",
                ErrorCode.BAD_FRAME,
            )
        view = self._data[self._pos : end]
        self._pos = end
        return view

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def raw(self, n: int) -> bytes:
        return bytes(self._take(n))

    def rest(self) -> bytes:
        return self.raw(len(self._data) - self._pos)

    def key(self, limits: Limits) -> bytes:
        n = self.u16()
        if n == 0:
            raise ProtocolError("empty key", ErrorCode.BAD_FRAME)
        if n > limits.max_key_len:
            raise ProtocolError(f"key of {n} bytes exceeds the limit of {limits.max_key_len}", ErrorCode.LIMIT)
        return self.raw(n)

    def count(self, limits: Limits) -> int:
        n = self.u32()
        if n > limits.max_batch:
            raise ProtocolError(f"batch of {n} items exceeds the limit of {limits.max_batch}", ErrorCode.LIMIT)
        return n

    def status(self) -> Status:
        value = self.u8()
        try:
            return Status(value)
        except ValueError:
            raise ProtocolError(f"unknown status code {value}", ErrorCode.BAD_FRAME) from None

    # Bulk readers for the per-key lists: the hot path of every batch, so one tight loop each
    # instead of a method call per field. Same checks and errors as the single-field readers.

    def keys(self, limits: Limits) -> list[bytes]:
        n = self.count(limits)
        data, pos, end, cap = self._bytes, self._pos, len(self._bytes), limits.max_key_len
        out = []
        for _ in range(n):
            if pos + 2 > end:
                self._pos = pos
                self._take(2)  # raises the truncation error
            klen = (data[pos] << 8) | data[pos + 1]
            if klen == 0 or klen > cap:
                self._pos = pos + 2
                self._check_key_len(klen, limits)
            pos += 2
            if pos + klen > end:
                self._pos = pos
                self._take(klen)
            out.append(data[pos : pos + klen])
            pos += klen
        self._pos = pos
        return out

    def keyed(self, limits: Limits, fields: int, max_first: int | None) -> tuple[list[bytes], list[list[int]]]:
        """Keys each followed by ``fields`` u64s; ``max_first`` bounds the first u64 when it is a value size.

        Returns the keys and one list per field.
        """
        n = self.count(limits)
        data, pos, end, cap = self._bytes, self._pos, len(self._bytes), limits.max_key_len
        keys: list[bytes] = []
        cols: list[list[int]] = [[] for _ in range(fields)]
        unpack = _U64.unpack_from
        tail = 8 * fields
        for _ in range(n):
            if pos + 2 > end:
                self._pos = pos
                self._take(2)
            klen = (data[pos] << 8) | data[pos + 1]
            if klen == 0 or klen > cap:
                self._pos = pos + 2
                self._check_key_len(klen, limits)
            pos += 2
            if pos + klen + tail > end:
                self._pos = pos
                self._take(klen + tail)
            keys.append(data[pos : pos + klen])
            pos += klen
            for col in cols:
                col.append(unpack(data, pos)[0])
                pos += 8
            if max_first is not None and cols[0][-1] > max_first:
                raise ProtocolError(f"value of {cols[0][-1]} bytes exceeds the limit of {max_first}", ErrorCode.LIMIT)
        self._pos = pos
        return keys, cols

    def u64s(self, limits: Limits) -> list[int]:
        n = self.count(limits)
        raw = self._take(8 * n)
        return [v for (v,) in _U64.iter_unpack(raw)]

    def statuses(self, limits: Limits) -> list[Status]:
        return _statuses(bytes(self._take(self.count(limits))))

    def records(self, limits: Limits, fields: int) -> tuple[list[Status], list[int], list[list[int]]]:
        """Per key a status, a value length (bounded by the value limit) and ``fields - 1`` more u64s."""
        n = self.count(limits)
        rec = _RECORDS[fields]
        raw = self._take(rec.size * n)
        # One struct call for the whole batch, then strided slices: no Python loop per key.
        flat = struct.unpack("!" + rec.format.lstrip("!") * n, raw) if n else ()
        width = fields + 1
        lengths = list(flat[1::width])
        if lengths and max(lengths) > limits.max_value_len:
            bad = max(lengths)
            raise ProtocolError(f"value of {bad} bytes exceeds the limit of {limits.max_value_len}", ErrorCode.LIMIT)
        return _statuses(flat[0::width]), lengths, [list(flat[i::width]) for i in range(2, width)]

    @staticmethod
    def _check_key_len(n: int, limits: Limits) -> None:
        if n == 0:
            raise ProtocolError("empty key", ErrorCode.BAD_FRAME)
        raise ProtocolError(f"key of {n} bytes exceeds the limit of {limits.max_key_len}", ErrorCode.LIMIT)

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError(f"{len(self._data) - self._pos} trailing bytes after meta", ErrorCode.BAD_FRAME)


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> None:
        self.buf += _U8.pack(v)

    def u16(self, v: int) -> None:
        self.buf += _U16.pack(v)

    def u32(self, v: int) -> None:
        self.buf += _U32.pack(v)

    def u64(self, v: int) -> None:
        self.buf += _U64.pack(v)

    def blob16(self, b: bytes) -> None:
        if len(b) > 0xFFFF:  # say what is wrong instead of struct.error
            raise ValueError(f"a key or string of {len(b)} bytes does not fit the wire's 16-bit length")
        self.u16(len(b))
        self.buf += b


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    op: ClassVar[Op]
    response: ClassVar[bool] = False

    def payload_len(self) -> int:
        return 0


@dataclass(frozen=True)
class Hello(Message):
    """The node's first frame: who it is, whether it needs the key, its challenge and its limits."""

    op: ClassVar[Op] = Op.HELLO
    node_id: str
    auth_required: bool
    nonce: bytes
    max_batch: int = 1024
    max_value_len: int = 1 << 30
    max_payload_len: int = 1 << 30
    max_meta_len: int = 1 << 20


@dataclass(frozen=True)
class Auth(Message):
    """The client's answer: its own challenge for the node, its id (lease owner) and its proof."""

    op: ClassVar[Op] = Op.AUTH
    client_nonce: bytes = bytes(NONCE_LEN)
    client_id: bytes = bytes(CLIENT_ID_LEN)
    proof: bytes = b""


@dataclass(frozen=True)
class AuthOk(Message):
    """The node's proof that it holds the key too (empty when it has none)."""

    op: ClassVar[Op] = Op.AUTH_OK
    proof: bytes = b""


@dataclass(frozen=True)
class PutRequest(Message):
    """Store values; each carries the writer's version (a newer stored value or delete wins)."""

    op: ClassVar[Op] = Op.PUT
    keys: Sequence[bytes]
    sizes: Sequence[int]
    versions: Sequence[int]

    def payload_len(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class GetRequest(Message):
    """Read values; each key names the largest value its buffer can take (``exact``: only that size)."""

    op: ClassVar[Op] = Op.GET
    keys: Sequence[bytes]
    capacities: Sequence[int]
    exact: bool = False


@dataclass(frozen=True)
class RdmaPutRequest(Message):
    """PUT over verbs: the node RDMA-READs each value from the client's page ``addrs[i]`` (``rkeys[i]``)
    inside the session's registered region; no value bytes follow the frame."""

    op: ClassVar[Op] = Op.RPUT
    session: int
    keys: Sequence[bytes]
    sizes: Sequence[int]
    versions: Sequence[int]
    addrs: Sequence[int]
    rkeys: Sequence[int]


@dataclass(frozen=True)
class RdmaGetRequest(Message):
    """GET over verbs: the node RDMA-WRITEs each found value to ``addrs[i]`` (``rkeys[i]``), waits
    for every completion, then answers; ``capacities`` and ``exact`` as for GET."""

    op: ClassVar[Op] = Op.RGET
    session: int
    keys: Sequence[bytes]
    capacities: Sequence[int]
    addrs: Sequence[int]
    rkeys: Sequence[int]
    exact: bool = False


@dataclass(frozen=True)
class ExistsRequest(Message):
    """Look up keys; a non-zero ``lease_ttl_ms`` also leases each found key (one lease id each)."""

    op: ClassVar[Op] = Op.EXISTS
    keys: Sequence[bytes]
    lease_ttl_ms: int = 0


@dataclass(frozen=True)
class ReleaseRequest(Message):
    """Give back leases by id; only the client that took a lease can release it."""

    op: ClassVar[Op] = Op.RELEASE
    lease_ids: Sequence[int]


@dataclass(frozen=True)
class DeleteRequest(Message):
    """Delete keys whose stored version is at most the given one, leaving a tombstone."""

    op: ClassVar[Op] = Op.DELETE
    keys: Sequence[bytes]
    versions: Sequence[int]


@dataclass(frozen=True)
class ListRequest(Message):
    """One page of keys starting with ``prefix`` and sorting after ``cursor``."""

    op: ClassVar[Op] = Op.LIST
    prefix: bytes = b""
    cursor: bytes = b""
    limit: int = 1000


@dataclass(frozen=True)
class PingRequest(Message):
    op: ClassVar[Op] = Op.PING
    data: bytes = b""


@dataclass(frozen=True)
class StatsRequest(Message):
    op: ClassVar[Op] = Op.STATS


@dataclass(frozen=True)
class StatusResponse(Message):
    """Per-key statuses (PUT, RELEASE, DELETE)."""

    op: ClassVar[Op] = Op.PUT
    response: ClassVar[bool] = True
    statuses: Sequence[Status]


@dataclass(frozen=True)
class PutResponse(StatusResponse):
    op: ClassVar[Op] = Op.PUT


@dataclass(frozen=True)
class ReleaseResponse(StatusResponse):
    op: ClassVar[Op] = Op.RELEASE


@dataclass(frozen=True)
class DeleteResponse(StatusResponse):
    op: ClassVar[Op] = Op.DELETE


@dataclass(frozen=True)
class RdmaPutResponse(StatusResponse):
    op: ClassVar[Op] = Op.RPUT


@dataclass(frozen=True)
class GetResponse(Message):
    """Per key status, value length and version; the payload holds the OK values, in order."""

    op: ClassVar[Op] = Op.GET
    response: ClassVar[bool] = True
    statuses: Sequence[Status]
    lengths: Sequence[int]
    versions: Sequence[int]

    def payload_len(self) -> int:
        return sum(n for s, n in zip(self.statuses, self.lengths, strict=True) if s == Status.OK)


@dataclass(frozen=True)
class RdmaGetResponse(GetResponse):
    """As GET's answer, but the values are already in the client's pages: no payload."""

    op: ClassVar[Op] = Op.RGET

    def payload_len(self) -> int:
        return 0


@dataclass(frozen=True)
class ExistsResponse(Message):
    """Per key status, value length, version and lease id (0: not leased)."""

    op: ClassVar[Op] = Op.EXISTS
    response: ClassVar[bool] = True
    statuses: Sequence[Status]
    lengths: Sequence[int]
    versions: Sequence[int]
    lease_ids: Sequence[int]


@dataclass(frozen=True)
class ListResponse(Message):
    op: ClassVar[Op] = Op.LIST
    response: ClassVar[bool] = True
    keys: Sequence[bytes]
    sizes: Sequence[int]
    next_cursor: bytes = b""  # empty: no more pages


@dataclass(frozen=True)
class PingResponse(Message):
    op: ClassVar[Op] = Op.PING
    response: ClassVar[bool] = True
    data: bytes = b""


@dataclass(frozen=True)
class StatsResponse(Message):
    op: ClassVar[Op] = Op.STATS
    response: ClassVar[bool] = True
    body: bytes = field(default=b"{}")  # UTF-8 JSON


@dataclass(frozen=True)
class ErrorFrame(Message):
    op: ClassVar[Op] = Op.ERROR
    code: int = ErrorCode.INTERNAL
    message: str = ""


# --------------------------------------------------------------------------- encode


def _key_lengths(keys: Sequence[bytes]) -> list[int]:
    lengths = list(map(len, keys))
    if lengths and max(lengths) > 0xFFFF:  # say what is wrong instead of struct.error
        raise ValueError(f"a key or string of {max(lengths)} bytes does not fit the wire's 16-bit length")
    return lengths


def _encode_keys(w: _Writer, keys: Sequence[bytes]) -> None:
    # Length, key, length, key, ...: interleaved by C-level iterators, no Python call per key.
    w.u32(len(keys))
    w.buf += b"".join(chain.from_iterable(zip(map(_U16.pack, _key_lengths(keys)), keys)))


def _encode_keyed(w: _Writer, keys: Sequence[bytes], *cols: Sequence[int]) -> None:
    """Keys each followed by one u64 from every column."""
    for col in cols:
        if len(col) != len(keys):
            raise ValueError("every per-key field needs one value per key")
    w.u32(len(keys))
    pack = struct.Struct("!" + "Q" * len(cols)).pack
    w.buf += b"".join(chain.from_iterable(zip(map(_U16.pack, _key_lengths(keys)), keys, map(pack, *cols))))


def _check_rkeys(rkeys: Sequence[int]) -> None:
    if any(not 0 <= k <= MAX_RKEY for k in rkeys):
        raise ValueError("an rkey must fit 32 bits")


def _encode_records(w: _Writer, statuses: Sequence[Status], *cols: Sequence[int]) -> None:
    n = len(statuses)
    for col in cols:
        if len(col) != n:
            raise ValueError("every per-key field needs one value per status")
    w.u32(n)
    flat: list[int] = [0] * (n * (len(cols) + 1))
    width = len(cols) + 1
    flat[0::width] = statuses
    for i, col in enumerate(cols, 1):
        flat[i::width] = col
    w.buf += struct.pack("!" + _RECORDS[len(cols)].format.lstrip("!") * n, *flat)


def _encode_meta(msg: Message) -> bytes:
    w = _Writer()
    if isinstance(msg, Hello):
        if len(msg.nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        w.u8(1 if msg.auth_required else 0)
        w.buf += msg.nonce
        w.u32(msg.max_batch)
        w.u64(msg.max_value_len)
        w.u64(msg.max_payload_len)
        w.u32(msg.max_meta_len)
        w.blob16(msg.node_id.encode())
    elif isinstance(msg, Auth):
        if len(msg.client_nonce) != NONCE_LEN or len(msg.client_id) != CLIENT_ID_LEN:
            raise ValueError(f"client nonce must be {NONCE_LEN} bytes and client id {CLIENT_ID_LEN}")
        w.buf += msg.client_nonce + msg.client_id
        w.u8(len(msg.proof))
        w.buf += msg.proof
    elif isinstance(msg, AuthOk):
        w.u8(len(msg.proof))
        w.buf += msg.proof
    elif isinstance(msg, StatsRequest):
        pass
    elif isinstance(msg, PutRequest):
        _encode_keyed(w, msg.keys, msg.sizes, msg.versions)
    elif isinstance(msg, GetRequest):
        w.u8(1 if msg.exact else 0)
        _encode_keyed(w, msg.keys, msg.capacities)
    elif isinstance(msg, RdmaPutRequest):
        _check_rkeys(msg.rkeys)
        w.u64(msg.session)
        _encode_keyed(w, msg.keys, msg.sizes, msg.versions, msg.addrs, msg.rkeys)
    elif isinstance(msg, RdmaGetRequest):
        _check_rkeys(msg.rkeys)
        w.u8(1 if msg.exact else 0)
        w.u64(msg.session)
        _encode_keyed(w, msg.keys, msg.capacities, msg.addrs, msg.rkeys)
    elif isinstance(msg, ExistsRequest):
        w.u32(msg.lease_ttl_ms)
        _encode_keys(w, msg.keys)
    elif isinstance(msg, ReleaseRequest):
        w.u32(len(msg.lease_ids))
        w.buf += b"".join([_U64.pack(i) for i in msg.lease_ids])
    elif isinstance(msg, DeleteRequest):
        _encode_keyed(w, msg.keys, msg.versions)
    elif isinstance(msg, ListRequest):
        w.u32(msg.limit)
        w.blob16(msg.prefix)
        w.blob16(msg.cursor)
    elif isinstance(msg, PingRequest | PingResponse):
        w.blob16(msg.data)
    elif isinstance(msg, StatusResponse):
        w.u32(len(msg.statuses))
        w.buf += bytes(msg.statuses)
    elif isinstance(msg, GetResponse):
        _encode_records(w, msg.statuses, msg.lengths, msg.versions)
    elif isinstance(msg, ExistsResponse):
        _encode_records(w, msg.statuses, msg.lengths, msg.versions, msg.lease_ids)
    elif isinstance(msg, ListResponse):
        _encode_keyed(w, msg.keys, msg.sizes)
        w.blob16(msg.next_cursor)
    elif isinstance(msg, StatsResponse):
        w.buf += msg.body
    elif isinstance(msg, ErrorFrame):
        w.u16(msg.code)
        # Cut at a character boundary so the peer decodes what we meant, not U+FFFD.
        w.blob16(msg.message.encode()[:_MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode())
    else:  # pragma: no cover - every message type is listed above
        raise TypeError(f"cannot encode {type(msg).__name__}")
    return bytes(w.buf)


def encode(msg: Message, request_id: int) -> bytes:
    """Header plus meta for ``msg``; the payload (value bytes) is sent separately."""
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request id {request_id} out of range")
    op = msg.op | (RESPONSE_BIT if msg.response else 0)
    try:
        meta = _encode_meta(msg)
        return encode_header(Header(op, request_id, meta_len=len(meta), payload_len=msg.payload_len())) + meta
    except struct.error as exc:  # a field out of its wire range: name the message, not the struct format
        raise ValueError(f"cannot encode {type(msg).__name__}: {exc}") from None


# --------------------------------------------------------------------------- decode


def _check_remote(rkeys: Sequence[int]) -> None:
    """Only the shape is checked here; the node checks each range against the session's region."""
    if rkeys and max(rkeys) > MAX_RKEY:
        raise ProtocolError(f"rkey {max(rkeys)} does not fit 32 bits", ErrorCode.BAD_FRAME)


def _decode_request(op: Op, r: _Reader, limits: Limits) -> Message:
    if op is Op.AUTH:
        client_nonce = r.raw(NONCE_LEN)
        client_id = r.raw(CLIENT_ID_LEN)
        return Auth(client_nonce=client_nonce, client_id=client_id, proof=r.raw(r.u8()))
    if op is Op.PUT:
        keys, (sizes, versions) = r.keyed(limits, 2, limits.max_value_len)
        return PutRequest(keys=keys, sizes=sizes, versions=versions)
    if op is Op.GET:
        flags = r.u8()
        if flags > 1:
            raise ProtocolError(f"unknown GET flags 0x{flags:02x}", ErrorCode.BAD_FRAME)
        # A capacity is the size of the reader's buffer, an upper bound and not a value: a big
        # buffer is fine (values over it are misses), so the value limit does not apply.
        keys, (caps,) = r.keyed(limits, 1, None)
        return GetRequest(keys=keys, capacities=caps, exact=bool(flags))
    if op is Op.RPUT:
        session = r.u64()
        keys, (sizes, versions, addrs, rkeys) = r.keyed(limits, 4, limits.max_value_len)
        _check_remote(rkeys)
        return RdmaPutRequest(session=session, keys=keys, sizes=sizes, versions=versions, addrs=addrs, rkeys=rkeys)
    if op is Op.RGET:
        flags = r.u8()
        if flags > 1:
            raise ProtocolError(f"unknown RGET flags 0x{flags:02x}", ErrorCode.BAD_FRAME)
        session = r.u64()
        keys, (caps, addrs, rkeys) = r.keyed(limits, 3, None)
        _check_remote(rkeys)
        return RdmaGetRequest(session=session, keys=keys, capacities=caps, addrs=addrs, rkeys=rkeys, exact=bool(flags))
    if op is Op.EXISTS:
        ttl = r.u32()
        return ExistsRequest(keys=r.keys(limits), lease_ttl_ms=ttl)
    if op is Op.RELEASE:
        return ReleaseRequest(lease_ids=r.u64s(limits))
    if op is Op.DELETE:
        keys, (versions,) = r.keyed(limits, 1, None)
        return DeleteRequest(keys=keys, versions=versions)
    if op is Op.LIST:
        limit = r.u32()
        if not 0 < limit <= limits.max_list_limit:
            raise ProtocolError(f"list limit {limit} outside 1..{limits.max_list_limit}", ErrorCode.LIMIT)
        prefix = r.raw(r.u16())
        cursor = r.raw(r.u16())
        if len(prefix) > limits.max_key_len or len(cursor) > limits.max_key_len:
            raise ProtocolError("list prefix or cursor longer than the key limit", ErrorCode.LIMIT)
        return ListRequest(prefix=prefix, cursor=cursor, limit=limit)
    if op is Op.PING:
        return PingRequest(data=r.raw(r.u16()))
    if op is Op.STATS:
        return StatsRequest()
    if op is Op.HELLO:
        auth_required = bool(r.u8())
        nonce = r.raw(NONCE_LEN)
        max_batch, max_value, max_payload, max_meta = r.u32(), r.u64(), r.u64(), r.u32()
        node_id = r.raw(r.u16()).decode("utf-8", "replace")
        return Hello(
            node_id=node_id,
            auth_required=auth_required,
            nonce=nonce,
            max_batch=max_batch,
            max_value_len=max_value,
            max_payload_len=max_payload,
            max_meta_len=max_meta,
        )
    if op is Op.AUTH_OK:
        return AuthOk(proof=r.raw(r.u8()))
    if op is Op.ERROR:
        code = r.u16()
        return ErrorFrame(code=code, message=r.raw(r.u16()).decode("utf-8", "replace"))
    raise ProtocolError(f"opcode {op.name} is not valid here", ErrorCode.UNKNOWN_OP)


def _decode_response(op: Op, r: _Reader, limits: Limits) -> Message:
    if op in (Op.PUT, Op.RELEASE, Op.DELETE, Op.RPUT):
        cls = {Op.PUT: PutResponse, Op.RELEASE: ReleaseResponse, Op.DELETE: DeleteResponse, Op.RPUT: RdmaPutResponse}[op]
        return cls(statuses=r.statuses(limits))
    if op in (Op.GET, Op.RGET):
        statuses, lengths, (versions,) = r.records(limits, 2)
        get_cls = RdmaGetResponse if op is Op.RGET else GetResponse
        return get_cls(statuses=statuses, lengths=lengths, versions=versions)
    if op is Op.EXISTS:
        statuses, lengths, (versions, lease_ids) = r.records(limits, 3)
        return ExistsResponse(statuses=statuses, lengths=lengths, versions=versions, lease_ids=lease_ids)
    if op is Op.LIST:
        keys, (sizes,) = r.keyed(limits, 1, limits.max_value_len)
        return ListResponse(keys=keys, sizes=sizes, next_cursor=r.raw(r.u16()))
    if op is Op.PING:
        return PingResponse(data=r.raw(r.u16()))
    if op is Op.STATS:
        return StatsResponse(body=r.rest())
    raise ProtocolError(f"opcode {op.name} has no response form", ErrorCode.UNKNOWN_OP)  # pragma: no cover


def decode(header: Header, meta: bytes | bytearray | memoryview, limits: Limits) -> Message:
    """Decode a frame's meta; checks that the header's payload length agrees with it."""
    if len(meta) != header.meta_len:
        raise ProtocolError(f"meta is {len(meta)} bytes, header says {header.meta_len}", ErrorCode.BAD_FRAME)
    r = _Reader(meta)
    op = header.base_op
    msg = _decode_response(op, r, limits) if header.is_response else _decode_request(op, r, limits)
    r.finish()
    if msg.payload_len() != header.payload_len:
        raise ProtocolError(
            f"payload length {header.payload_len} does not match the {msg.payload_len()} bytes the meta describes",
            ErrorCode.BAD_FRAME,
        )
    return msg
