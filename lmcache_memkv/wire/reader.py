"""The one frame reader, sans-IO: node and client both read frames through it."""

from __future__ import annotations

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.wire.constants import ErrorCode
from lmcache_memkv.wire.frames import HEADER_LEN, Header, decode_header
from lmcache_memkv.wire.limits import Limits
from lmcache_memkv.wire.messages import Message, decode


class FrameReader:
    """Sans-IO frame reader shared by node and client: it says how many bytes it needs next, the
    transport reads exactly that many and feeds them back; limits are checked on the header before
    the meta is read. The payload (value bytes) is left to the caller, who knows where it goes.
    """

    def __init__(self, limits: Limits, max_meta_len: int | None = None) -> None:
        self.limits = limits
        self.max_meta_len = max_meta_len  # a tighter meta cap, e.g. before authentication
        self._header: Header | None = None

    @property
    def mid_frame(self) -> bool:
        """A header is in and its meta is still to come."""
        return self._header is not None

    def next_size(self) -> int:
        return HEADER_LEN if self._header is None else self._header.meta_len

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[Header, Message] | None:
        """Feed exactly ``next_size()`` bytes; returns the header and decoded meta once a frame's meta is in."""
        if self._header is None:
            header = decode_header(data, self.limits)
            if self.max_meta_len is not None and header.meta_len > self.max_meta_len:
                raise ProtocolError(
                    f"frame of {header.meta_len} meta bytes before authentication", ErrorCode.AUTH_REQUIRED
                )
            if header.meta_len:
                self._header = header
                return None
            return header, decode(header, b"", self.limits)
        header, self._header = self._header, None
        return header, decode(header, data, self.limits)
