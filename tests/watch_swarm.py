"""Many watching clients in one process, for tests/test_control_watchers.py.

    python tests/watch_swarm.py ENDPOINT KEY_HEX STREAMS CHANNELS EXPECT_NODE DEADLINE_S

Opens STREAMS ``Cluster/Watch`` streams to ENDPOINT over CHANNELS connections of their own
(grpc.aio, one event loop), each request signed and every answer checked as the real client
does (``auth.sign``, ``response_auth.check_reply`` with the message's index). Prints to stdout:

    open N             once every stream has received its first view (N = STREAMS)
    seen S errors E    once every stream has seen EXPECT_NODE ALIVE in a view, or at DEADLINE_S
    error CODE DETAIL  for the first few failures (refusals, ends, bad proofs), as they happen
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc

from lmcache_memkv.control.auth import HEADER, sign
from lmcache_memkv.control.convert import view_from_proto
from lmcache_memkv.control.member import State
from lmcache_memkv.control.response_auth import WATCH, check_reply, fresh_nonce
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc

_MAX_REPORTED = 10


class Swarm:
    def __init__(self, endpoint: str, key: bytes, streams: int, expect: str) -> None:
        self.endpoint = endpoint
        self.key = key
        self.streams = streams
        self.expect = expect
        self.opened = 0
        self.seen = 0
        self.errors = 0
        self.all_open = asyncio.Event()
        self.all_seen = asyncio.Event()

    def fail(self, code: str, detail: str) -> None:
        self.errors += 1
        if self.errors <= _MAX_REPORTED:
            print(f"error {code} {detail}", flush=True)

    async def watch(self, stub: cluster_pb2_grpc.ClusterStub) -> None:
        request = cluster_pb2.WatchRequest(nonce=fresh_nonce())
        proof = sign(self.key, WATCH, self.endpoint, request.SerializeToString())
        call = stub.Watch(request, metadata=[(HEADER, proof)])
        opened = False
        try:
            index = 0
            async for reply in call:
                check_reply(self.key, WATCH, request, reply, index)
                index += 1
                if not reply.HasField("view"):
                    continue
                _, members = view_from_proto(reply.view)
                if not opened:
                    opened = True
                    self.opened += 1
                    if self.opened == self.streams:
                        self.all_open.set()
                if any(m.node_id == self.expect and m.state is State.ALIVE for m in members):
                    self.seen += 1
                    if self.seen == self.streams:
                        self.all_seen.set()
                    return
            self.fail("ENDED", "the stream ended before the new member showed")
        except grpc.aio.AioRpcError as exc:
            self.fail(exc.code().name, exc.details() or "")
        except ValueError as exc:  # a refused proof, a malformed view
            self.fail("REFUSED", str(exc))
        finally:
            call.cancel()


async def main(endpoint: str, key: bytes, streams: int, channels: int, expect: str, deadline_s: float) -> None:
    swarm = Swarm(endpoint, key, streams, expect)
    # A local subchannel pool per channel: each gets a connection of its own, as sidecars do.
    opened = [
        grpc.aio.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)
    ]
    stubs = [cluster_pb2_grpc.ClusterStub(c) for c in opened]
    tasks = [asyncio.create_task(swarm.watch(stubs[i % channels])) for i in range(streams)]
    deadline = time.monotonic() + deadline_s
    for event, say in ((swarm.all_open, lambda: f"open {swarm.opened}"), (swarm.all_seen, None)):
        try:
            await asyncio.wait_for(event.wait(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if say is not None:
            print(say(), flush=True)
    print(f"seen {swarm.seen} errors {swarm.errors}", flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in opened:
        await channel.close()


if __name__ == "__main__":
    endpoint, key_hex, streams, channels, expect, deadline_s = sys.argv[1:7]
    asyncio.run(main(endpoint, bytes.fromhex(key_hex), int(streams), int(channels), expect, float(deadline_s)))
