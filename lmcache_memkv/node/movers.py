"""Byte movers: execute a ``NodeCore`` plan over one transport.

A mover serves one connection at a time, on a worker thread, with blocking I/O bounded by the
request's deadline. The TCP mover reads each PUT value straight into its arena extent
(``recv_into``) and sends a GET's answer and values in gathered writes (``sendmsg`` of arena
views): no copies of value bytes in Python.

An RDMA mover fits the same seam: its PUT posts an RDMA READ from the client's registered page
(address and rkey from the request) into the view ``claim`` returns, waits for the completion,
then calls ``landed``; its GET posts RDMA WRITEs of ``views()`` into the client's pages and
waits for every completion before ``reply`` sends the answer, so a client never sees OK for
bytes that have not landed. A refused value costs it nothing (there are no bytes to drain).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from lmcache_memkv.transport.tcp import Buffer, drain, recv_into_exact, send_views, wait_for_data

if TYPE_CHECKING:
    from lmcache_memkv.node.core import GetPlan, PutPlan

_SCRATCH = 256 << 10  # discard buffer for values a PUT could not store


class Mover(Protocol):
    def put(self, plan: PutPlan, deadline: float) -> None:
        """Bring each value into the view ``plan.claim(i)`` returns (or discard it when None),
        call ``plan.landed()`` once it is in, then send ``plan.answer()``."""
        ...

    def get(self, plan: GetPlan, deadline: float) -> None:
        """Deliver ``plan.views()`` to the client and answer with ``plan.head``."""
        ...

    def reply(self, frames: Sequence[Buffer], deadline: float) -> None:
        """Send an answer that carries no value bytes."""
        ...


class TcpMover:
    """Value bytes follow the request on the connection's socket, and follow the answer back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def put(self, plan: PutPlan, deadline: float) -> None:
        sock = self.sock
        scratch: memoryview | None = None  # only a refused value needs it; most requests never do
        for i, size in enumerate(plan.sizes):
            if size:
                # Reserve only once the value's bytes start to arrive: a peer that announces
                # values and then stalls or hangs up makes the node evict nothing.
                wait_for_data(sock, deadline)
            dst = plan.claim(i)
            if dst is None:
                if scratch is None:
                    scratch = memoryview(bytearray(min(_SCRATCH, max(size, 1))))
                drain(sock, size, scratch, deadline)
                continue
            recv_into_exact(sock, dst, deadline)  # straight into the arena
            plan.landed()
        send_views(sock, [plan.answer()], deadline)

    def get(self, plan: GetPlan, deadline: float) -> None:
        # Pinned extents stay put until the plan is released, so an overwrite cannot tear what we send.
        send_views(self.sock, [plan.head, *plan.views()], deadline)

    def reply(self, frames: Sequence[Buffer], deadline: float) -> None:
        send_views(self.sock, frames, deadline)
