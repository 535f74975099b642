"""The first view: ask every configured control endpoint at once, take the first answer that
proves the key (with a key configured: a node without it cannot hand this client a view)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from lmcache_memkv.control.channel import ChannelPool, describe_rpc_error
from lmcache_memkv.control.convert import view_from_proto
from lmcache_memkv.control.member import Member
from lmcache_memkv.control.response_auth import MEMBER_LIST, ReplyRefused, fresh_nonce
from lmcache_memkv.errors import ConnectError
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc

R = TypeVar("R")
SERVERS_HINT = (
    'check MEMKV_SERVERS / the adapter\'s "servers" field: it lists control endpoints HOST:PORT '
    "of `memkv node` (by default the data port + 1)"
)


def first_answer(
    pool: ChannelPool,
    servers: Sequence[str],
    call: Callable[[grpc.Channel, float], grpc.Future],
    accept: Callable[[Any], R],
    timeout_s: float,
) -> tuple[R, str]:
    """Ask every control endpoint at once (``call``) and return the first reply ``accept`` takes
    (it raises ValueError to refuse one, ``ReplyRefused`` for an answer that does not prove the
    key), with the endpoint that gave it. If none does within
    ``timeout_s``: ConnectError naming every endpoint tried and why."""
    servers = list(dict.fromkeys(servers))  # a repeated endpoint is asked once
    done = threading.Event()
    lock = threading.Lock()
    errors: dict[str, str] = {}
    answer: list[tuple[R, str]] = []

    def finished(endpoint: str, future: grpc.Future) -> None:
        with lock:
            if future.cancelled():
                errors[endpoint] = "cancelled"
            elif future.exception() is not None:
                errors[endpoint] = describe_rpc_error(future.exception())
            elif not answer:
                try:
                    answer.append((accept(future.result()), endpoint))
                except ReplyRefused as refused:
                    errors[endpoint] = f"refused: {refused}"
                except ValueError as bad:
                    errors[endpoint] = f"malformed reply: {bad}"
            if answer or len(errors) == len(servers):
                done.set()

    calls = []
    for endpoint in servers:
        try:
            future = call(pool.get(endpoint), timeout_s)
        except (ValueError, RuntimeError) as exc:  # e.g. an endpoint gRPC cannot parse
            with lock:
                errors[endpoint] = str(exc)
                if len(errors) == len(servers):
                    done.set()
            continue
        calls.append(future)
        future.add_done_callback(lambda f, ep=endpoint: finished(ep, f))
    done.wait(timeout_s + 0.5)
    for future in calls:
        future.cancel()
    with lock:
        if answer:
            return answer[0]
        tried = "; ".join(f"{ep} ({errors.get(ep, f'no answer within {timeout_s:g}s')})" for ep in servers)
    raise ConnectError(f"no MemKV control endpoint answered: tried {tried}; {SERVERS_HINT}")


def fetch_view(pool: ChannelPool, servers: Sequence[str], timeout_s: float) -> tuple[int, list[Member], str]:
    """Epoch, members and the endpoint that answered first; ConnectError naming every server if none did."""

    request = cluster_pb2.MemberListRequest(nonce=fresh_nonce())

    def call(channel: grpc.Channel, timeout: float) -> grpc.Future:
        return cluster_pb2_grpc.ClusterStub(channel).MemberList.future(request, timeout=timeout)

    def accept(reply: cluster_pb2.MemberListResponse) -> tuple[int, list[Member]]:
        pool.check_reply(MEMBER_LIST, request, reply)
        return view_from_proto(reply.view)

    (epoch, members), endpoint = first_answer(pool, servers, call, accept, timeout_s)
    return epoch, members, endpoint
