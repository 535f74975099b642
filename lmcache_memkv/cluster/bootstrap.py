"""The first view: ask every configured control endpoint at once, take the first answer that
proves the key (with a key configured: a node without it cannot hand this client a view).

A configured endpoint may also be a node's data port, as MinIO's ``MEMKV_SERVERS`` spells it
(``:9900``): the data plane greets every connection with a HELLO frame (``MK``...), the control
plane does not (plaintext gRPC sends its HTTP/2 settings at once, TLS waits for the client until
the probe's short timeout), so a probe tells them apart and a data port is asked at port + 1,
the control endpoint's default place.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from lmcache_memkv.cluster.cluster_id import ClusterIdentity, WrongCluster
from lmcache_memkv.control.channel import ChannelPool, describe_rpc_error
from lmcache_memkv.control.convert import view_from_proto
from lmcache_memkv.control.member import Member
from lmcache_memkv.control.response_auth import MEMBER_LIST, ReplyRefused, fresh_nonce
from lmcache_memkv.endpoints import format_endpoint, parse_endpoint
from lmcache_memkv.errors import ConnectError
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc
from lmcache_memkv.wire.constants import MAGIC

R = TypeVar("R")
SERVERS_HINT = (
    "check that `memkv node` runs there and that MEMKV_SERVERS / the adapter's \"servers\" field "
    "names its control endpoint HOST:PORT (by default the data port + 1) or its data port"
)
KEY_HINT = (
    "the nodes refused this client's key: MEMKV_AUTH_KEY / MEMKV_AUTH_KEY_FILE / the adapter's "
    '"auth_key_file" must hold the nodes\' 64-hex key (their MEMKV_AUTH_KEY / --auth-key-file), or none if they have none'
)
# A data port greets at once; this bounds what a silent (TLS) control port costs a probe.
_PROBE_S = 0.25


class KeyRefused(ConnectError):
    """Every endpoint that answered refused this client's key (or gave no proof of it)."""


def _is_key_refusal(exc: BaseException) -> bool:
    return isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.UNAUTHENTICATED


def probe_data_port(endpoint: str, timeout_s: float = _PROBE_S) -> bool | None:
    """Whether ``endpoint`` speaks the MemKV data protocol (greets with ``MK`` on connect): True,
    False (it accepted and said something else, or nothing), None (nothing listens there)."""
    try:
        host, port = parse_endpoint(endpoint, field="servers")
        sock = socket.create_connection((host.strip("[]"), port), timeout=timeout_s)
    except (OSError, ValueError):
        return None
    with sock:
        try:
            sock.settimeout(timeout_s)
            return sock.recv(len(MAGIC)) == MAGIC
        except OSError:  # silent: a TLS server waits for the client to speak first
            return False


def control_endpoints(servers: Sequence[str], known: MutableMapping[str, str] | None = None) -> list[str]:
    """Each configured server as a control endpoint: a data port becomes port + 1. ``known``
    (configured -> control) is consulted and updated, so a server is probed until it first answers."""
    known = {} if known is None else known
    todo = [s for s in dict.fromkeys(servers) if s not in known]
    if todo:
        with ThreadPoolExecutor(max_workers=min(16, len(todo)), thread_name_prefix="memkv-probe") as ex:
            for server, kind in zip(todo, ex.map(probe_data_port, todo)):
                if kind is True:
                    host, port = parse_endpoint(server, field="servers")
                    known[server] = format_endpoint(host.strip("[]"), port + 1)
                elif kind is False:
                    known[server] = server
    return [known.get(s, s) for s in servers]


def first_answer(
    pool: ChannelPool,
    servers: Sequence[str],
    call: Callable[[grpc.Channel, float], grpc.Future],
    accept: Callable[[Any], R],
    timeout_s: float,
    known: MutableMapping[str, str] | None = None,
) -> tuple[R, str]:
    """Ask every control endpoint at once (``call``) and return the first reply ``accept`` takes
    (it raises ValueError to refuse one, ``ReplyRefused`` for an answer that does not prove the
    key), with the endpoint that gave it. If none does within ``timeout_s``: ConnectError naming
    every endpoint tried and why (KeyRefused when every one refused the key). Data-port servers
    are asked at port + 1 (``control_endpoints``; ``known`` keeps what was found)."""
    servers = list(dict.fromkeys(control_endpoints(servers, known)))  # a repeated endpoint is asked once
    done = threading.Event()
    lock = threading.Lock()
    errors: dict[str, str] = {}
    refused: set[str] = set()  # endpoints that refused the key (or gave no proof of it)
    answer: list[tuple[R, str]] = []

    def finished(endpoint: str, future: grpc.Future) -> None:
        with lock:
            if future.cancelled():
                errors[endpoint] = "cancelled"
            elif future.exception() is not None:
                errors[endpoint] = describe_rpc_error(future.exception())
                if _is_key_refusal(future.exception()):
                    refused.add(endpoint)
            elif not answer:
                try:
                    answer.append((accept(future.result()), endpoint))
                except ReplyRefused as exc:
                    errors[endpoint] = f"refused: {exc}"
                    refused.add(endpoint)
                except WrongCluster as exc:
                    errors[endpoint] = f"refused: {exc}"
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
        if refused and refused == set(servers):
            raise KeyRefused(f"no MemKV control endpoint accepted this client's key: tried {tried}; {KEY_HINT}")
    raise ConnectError(f"no MemKV control endpoint answered: tried {tried}; {SERVERS_HINT}")


def fetch_view(
    pool: ChannelPool,
    servers: Sequence[str],
    timeout_s: float,
    known: MutableMapping[str, str] | None = None,
    cluster: ClusterIdentity | None = None,
) -> tuple[int, list[Member], str]:
    """Epoch, members and the endpoint that answered first; ConnectError naming every server if
    none did (KeyRefused when all refused the key). Data-port servers are asked at port + 1 (see
    ``control_endpoints``; ``known`` keeps what was found). With ``cluster``, answers from nodes
    of another cluster are refused (and the first id seen is pinned if none is configured)."""

    request = cluster_pb2.MemberListRequest(nonce=fresh_nonce())

    def call(channel: grpc.Channel, timeout: float) -> grpc.Future:
        return cluster_pb2_grpc.ClusterStub(channel).MemberList.future(request, timeout=timeout)

    def accept(reply: cluster_pb2.MemberListResponse) -> tuple[int, list[Member]]:
        pool.check_reply(MEMBER_LIST, request, reply)
        if cluster is not None:
            cluster.check(reply.header.cluster_id, f"node {reply.header.node_id!r}")
        return view_from_proto(reply.view)

    (epoch, members), endpoint = first_answer(pool, servers, call, accept, timeout_s, known)
    return epoch, members, endpoint
