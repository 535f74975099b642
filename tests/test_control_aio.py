"""The aio interceptor with handlers left sync (as a servicer may add them): they run in an
executor (slow methods in their own), their aborts reach the caller, and their streamed answers
are signed in order."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from lmcache_memkv.control.auth import NodeNames, ProofChecker
from lmcache_memkv.control.channel import open_channel
from lmcache_memkv.control.decoding import StrictDecoding
from lmcache_memkv.control.loop_thread import LoopThread
from lmcache_memkv.control.response_auth import WATCH, check_reply, fresh_nonce
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc, member_pb2

KEY = bytes(range(1, 33))


class _SyncCluster(cluster_pb2_grpc.ClusterServicer):
    def __init__(self) -> None:
        self.threads: dict[str, set[str]] = {"MemberList": set(), "Watch": set()}

    def MemberList(self, request: Any, context: Any) -> Any:
        self.threads["MemberList"].add(threading.current_thread().name)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "sync refusal")

    def Watch(self, request: Any, context: Any) -> Iterator[Any]:
        for epoch in (1, 2, 3):
            self.threads["Watch"].add(threading.current_thread().name)
            yield cluster_pb2.WatchResponse(header=member_pb2.ResponseHeader(node_id="s", epoch=epoch))


@pytest.fixture
def served() -> Iterator[tuple[str, _SyncCluster]]:
    loop = LoopThread("test-aio-loop")
    quick = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-sync")
    slow = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-slow")
    servicer = _SyncCluster()
    checker = ProofChecker(KEY, NodeNames("s"))

    async def build() -> Any:
        server = grpc.aio.server(interceptors=[StrictDecoding(checker, None, quick, slow, slow_methods={WATCH})])
        cluster_pb2_grpc.add_ClusterServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        checker.names = NodeNames("s", "127.0.0.1:0", port)
        await server.start()
        return server, port

    server, port = loop.run(build(), 10)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        loop.run(server.stop(0), 10)
        loop.close()
        quick.shutdown()
        slow.shutdown()


def test_sync_handlers_run_in_their_executor_abort_and_stream_signed(served: tuple[str, _SyncCluster]) -> None:
    endpoint, servicer = served
    channel = open_channel(endpoint, KEY)
    try:
        stub = cluster_pb2_grpc.ClusterStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.MemberList(cluster_pb2.MemberListRequest(nonce=fresh_nonce()), timeout=5)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and err.value.details() == "sync refusal"
        request = cluster_pb2.WatchRequest(nonce=fresh_nonce())
        replies = list(stub.Watch(request, timeout=5))
        assert [r.header.epoch for r in replies] == [1, 2, 3]
        for index, reply in enumerate(replies):
            check_reply(KEY, WATCH, request, reply, index)  # signed, each with its own index
    finally:
        channel.close()
    assert servicer.threads["MemberList"] and all(n.startswith("test-sync") for n in servicer.threads["MemberList"])
    assert servicer.threads["Watch"] and all(n.startswith("test-slow") for n in servicer.threads["Watch"])
