"""What the cluster client needs from a connection to one node, whatever moves the bytes.

``NodeClient`` (TCP) is one implementation; an RDMA client is another. The cluster client
places keys, counts replicas and keeps leases; an implementation moves value bytes between the
caller's buffers and one node, bounded by ``timeout_s``, and raises ``MemKVError`` (or
``OSError``) naming the node on any failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from lmcache_memkv.wire.constants import Status
from lmcache_memkv.wire.messages import ExistsResponse, GetResponse

Buffer = bytes | bytearray | memoryview


class DataClient(Protocol):
    endpoint: str
    client_id: bytes

    def put(
        self,
        keys: Sequence[bytes],
        values: Sequence[Buffer],
        timeout_s: float | None = None,
        versions: Sequence[int] | None = None,
    ) -> list[Status]: ...

    def read_into(
        self, keys: Sequence[bytes], buffers: Sequence[Buffer], timeout_s: float | None = None, exact: bool = False
    ) -> GetResponse: ...

    def lookup(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None) -> ExistsResponse: ...

    def release(self, lease_ids: Sequence[int], timeout_s: float | None = None) -> list[bool]: ...

    def delete_versions(
        self, keys: Sequence[bytes], versions: Sequence[int], timeout_s: float | None = None
    ) -> list[Status]: ...

    def list_keys(
        self, prefix: bytes = b"", cursor: bytes = b"", limit: int = 1000, timeout_s: float | None = None
    ) -> tuple[list[tuple[bytes, int]], bytes]: ...

    def close(self) -> None: ...

    # Optional (the cluster client looks it up with getattr): ``abort_transfers()`` makes sure no
    # transfer of a call that is still running can touch the caller's memory any more (RDMA:
    # fence the session's queue pair); called, from the caller's thread, for a node whose call
    # the fan-out gave up on. TCP needs nothing.


# endpoint, shared key, timeout, client id -> a client for one node (``NodeClient`` by default)
DataClientFactory = Callable[[str, bytes | None, float, bytes], DataClient]
