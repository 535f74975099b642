"""Bad input never takes the node down: each class gets an error frame and a closed connection,
other clients carry on, and the node's memory stays flat over hundreds of bad connections."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import rawwire
from nodeproc import NodeProcess

from lmcache_memkv.client import NodeClient
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import RESPONSE_BIT, VERSION, ErrorCode, Op
from lmcache_memkv.wire.messages import Auth, ExistsRequest, Hello, PutRequest, encode

FRAME_TIMEOUT = 0.5
U16, U32, U64 = struct.Struct("!H"), struct.Struct("!I"), struct.Struct("!Q")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess.start(
        capacity="64MiB", args=["--frame-timeout", str(FRAME_TIMEOUT)], log_dir=tmp_path_factory.mktemp("node")
    )
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def bystander(node: NodeProcess) -> Iterator[NodeClient]:
    """A well-behaved client whose pooled connection stays open through all the abuse."""
    c = node.client()
    c.put([b"keep"], [b"still here"])
    try:
        yield c
    finally:
        c.close()


def keys_meta(*keys: bytes, sizes: tuple[int, ...] | None = None, count: int | None = None) -> bytes:
    out = U32.pack(len(keys) if count is None else count)
    for i, k in enumerate(keys):
        out += U16.pack(len(k)) + k
        if sizes is not None:
            out += U64.pack(sizes[i])
    return out


def frame(op: int, meta: bytes, payload_len: int = 0, **kw: int) -> bytes:
    return rawwire.raw_header(op, meta_len=len(meta), payload_len=payload_len, **kw) + meta


# Bytes sent after a good handshake, and the error code the node must answer with.
BAD_FRAMES: dict[str, tuple[bytes, ErrorCode]] = {
    "oversized meta": (rawwire.raw_header(Op.PUT, meta_len=(1 << 20) + 1), ErrorCode.LIMIT),
    "oversized payload": (rawwire.raw_header(Op.PUT, meta_len=10, payload_len=1 << 62), ErrorCode.LIMIT),
    "oversized value": (frame(Op.PUT, keys_meta(b"k", sizes=(2 << 30,)), 2 << 30), ErrorCode.LIMIT),
    "oversized batch": (frame(Op.EXISTS, U32.pack(0) + keys_meta(*[b"k"] * 1025)), ErrorCode.LIMIT),
    "key over 512 bytes": (frame(Op.EXISTS, U32.pack(0) + keys_meta(b"k" * 513)), ErrorCode.LIMIT),
    "empty key": (frame(Op.DELETE, keys_meta(b"")), ErrorCode.BAD_FRAME),
    "unknown opcode": (frame(0x5A, b""), ErrorCode.UNKNOWN_OP),
    "response as request": (frame(Op.PING | RESPONSE_BIT, U16.pack(0)), ErrorCode.UNKNOWN_OP),
    "second auth": (encode(Auth(proof=b"x" * 32), 1), ErrorCode.UNKNOWN_OP),
    "bad magic (HTTP)": (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.BAD_FRAME),
    "bad version": (rawwire.raw_header(Op.PING, version=VERSION + 1), ErrorCode.BAD_VERSION),
    "payload does not add up": (frame(Op.PUT, keys_meta(b"a", b"b", sizes=(3, 4)), 8) + b"x" * 8, ErrorCode.BAD_FRAME),
    "count over meta": (frame(Op.DELETE, keys_meta(b"a", count=3)), ErrorCode.BAD_FRAME),
    "trailing meta": (frame(Op.DELETE, keys_meta(b"a") + b"junk"), ErrorCode.BAD_FRAME),
    "payload on EXISTS": (frame(Op.EXISTS, U32.pack(0) + keys_meta(b"a"), 5) + b"x" * 5, ErrorCode.BAD_FRAME),
    "list limit 0": (frame(Op.LIST, U32.pack(0) + U16.pack(0) * 2), ErrorCode.LIMIT),
}


def send_bad(node: NodeProcess, data: bytes) -> rawwire.ErrorFrame:
    sock = rawwire.connect(node.address)
    try:
        sock.sendall(data)
        return rawwire.expect_error(sock)
    finally:
        sock.close()


def assert_node_serves(node: NodeProcess, bystander: NodeClient) -> None:
    assert node.alive()
    buf = bytearray(10)
    assert bystander.get_into([b"keep"], [buf]) == [10] and buf == b"still here"
    with node.client() as fresh:
        assert fresh.ping() > 0


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_gets_error_and_close(node: NodeProcess, bystander: NodeClient, name: str) -> None:
    data, code = BAD_FRAMES[name]
    err = send_bad(node, data)
    assert err.code == code, err
    assert err.message
    assert_node_serves(node, bystander)


def test_frame_before_handshake_completes(node: NodeProcess, bystander: NodeClient) -> None:
    sock = socket.create_connection(node.address, timeout=5)
    try:
        rawwire.read_frame(sock)  # HELLO
        sock.sendall(b"\xff" * 64)
        assert rawwire.expect_error(sock).code == ErrorCode.BAD_FRAME
    finally:
        sock.close()
    assert_node_serves(node, bystander)


def test_truncated_frame_then_close(node: NodeProcess, bystander: NodeClient) -> None:
    used = bystander.stats()["used_bytes"]
    for data in (
        rawwire.raw_header(Op.PING)[:7],  # half a header
        frame(Op.DELETE, keys_meta(b"abc"))[:-2],  # meta cut short
        encode(PutRequest(keys=[b"t"], sizes=[1 << 20], versions=CLOCK.next(1)), 1) + b"x" * 1000,  # payload cut short
    ):
        sock = rawwire.connect(node.address)
        sock.sendall(data)
        sock.close()
    time.sleep(0.2)
    assert bystander.stats()["used_bytes"] == used  # the cut-off PUT gave its reservation back
    assert bystander.exists([b"t"]) == [None]
    assert_node_serves(node, bystander)


@pytest.mark.parametrize(
    "data",
    [
        rawwire.raw_header(Op.PING)[:5],  # mid-header
        frame(Op.EXISTS, U32.pack(0) + keys_meta(b"abc"))[:-1],  # mid-meta
        encode(PutRequest(keys=[b"stall"], sizes=[4 << 20], versions=CLOCK.next(1)), 1) + b"x" * 100_000,  # mid-payload
    ],
    ids=["header", "meta", "payload"],
)
def test_client_that_stops_mid_frame_times_out(node: NodeProcess, bystander: NodeClient, data: bytes) -> None:
    used = bystander.stats()["used_bytes"]
    sock = rawwire.connect(node.address)
    try:
        sock.sendall(data)
        started = time.monotonic()
        err = rawwire.expect_error(sock)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert err.code == ErrorCode.TIMEOUT and "frame not completed in time" in err.message
    assert FRAME_TIMEOUT * 0.8 < elapsed < FRAME_TIMEOUT + 2
    assert bystander.stats()["used_bytes"] == used
    assert_node_serves(node, bystander)


def test_client_that_never_authenticates_is_dropped(node: NodeProcess, bystander: NodeClient) -> None:
    sock = socket.create_connection(node.address, timeout=5)
    try:
        rawwire.read_frame(sock)  # HELLO, then silence
        assert rawwire.expect_error(sock).code == ErrorCode.TIMEOUT
    finally:
        sock.close()
    assert_node_serves(node, bystander)


def test_errors_are_counted_by_reason(node: NodeProcess) -> None:
    before = node.metric("memkv_node_protocol_errors_total", reason="unknown_op")
    send_bad(node, frame(0x5A, b""))
    assert node.metric("memkv_node_protocol_errors_total", reason="unknown_op") == before + 1
    assert "closing connection from" in node.log()


def _abuse(node: NodeProcess, rounds: int) -> None:
    """Many bad connections from four threads at once, cycling through every class."""
    cases: list[Callable[[], None]] = [lambda d=d: _one_bad(node, d) for d, _ in BAD_FRAMES.values()]
    cases.append(lambda: _cut_off(node))
    errors: list[BaseException] = []

    def run(offset: int) -> None:
        try:
            for i in range(offset, rounds, 4):
                cases[i % len(cases)]()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]


def _one_bad(node: NodeProcess, data: bytes) -> None:
    send_bad(node, data)


def _cut_off(node: NodeProcess) -> None:
    sock = rawwire.connect(node.address)
    sock.sendall(encode(PutRequest(keys=[b"cut"], sizes=[1 << 20], versions=CLOCK.next(1)), 1) + b"x" * 5000)
    sock.close()


def test_memory_and_threads_stay_flat_over_hundreds_of_bad_connections(
    node: NodeProcess, bystander: NodeClient
) -> None:
    _abuse(node, 100)  # warm up: thread stacks, malloc arenas and metric children get created once
    time.sleep(0.3)
    rss_before, threads_before = node.rss_kib(), node.thread_count()
    _abuse(node, 400)
    time.sleep(0.3)
    rss_after, threads_after = node.rss_kib(), node.thread_count()
    print(f"node RSS {rss_before} KiB -> {rss_after} KiB over 400 bad connections; threads {threads_before}")
    # Tolerance: 4 MiB (a leak of even 10 KiB per connection would show as 4 MB here).
    assert rss_after - rss_before < 4096, (rss_before, rss_after)
    assert threads_after <= threads_before, (threads_before, threads_after)
    assert node.metric("memkv_node_connections") == 1  # only the bystander's pooled connection
    assert_node_serves(node, bystander)


def test_ok_after_exists_request_encoding(node: NodeProcess) -> None:
    """Sanity check for the raw helpers: a correct frame on a raw socket gets a normal answer."""
    sock = rawwire.connect(node.address)
    try:
        sock.sendall(encode(ExistsRequest(keys=[b"keep"]), 9))
        header, _, _ = rawwire.read_frame(sock)
        assert header.request_id == 9 and header.op == Op.EXISTS | RESPONSE_BIT
    finally:
        sock.close()


def test_big_frame_before_auth_is_refused_unread(node: NodeProcess, bystander: NodeClient) -> None:
    # Before AUTH the node reads no more than an AUTH frame needs, whatever the header claims.
    sock = socket.create_connection(node.address, timeout=5)
    try:
        rawwire.read_frame(sock)  # HELLO
        sock.sendall(rawwire.raw_header(Op.AUTH, meta_len=512 << 10))
        err = rawwire.expect_error(sock)
        assert err.code == ErrorCode.AUTH_REQUIRED and "before authentication" in err.message
    finally:
        sock.close()
    assert bystander.exists([b"keep"]) == [10]


def test_connections_over_the_cap_are_refused_with_a_reason(node_factory: Callable[..., NodeProcess]) -> None:
    capped = node_factory(args=["--max-connections", "2"])
    first, second = capped.client(), capped.client()
    held = [rawwire.connect(capped.address), rawwire.connect(capped.address)]
    try:
        sock = socket.create_connection(capped.address, timeout=5)
        _, hello, _ = rawwire.read_frame(sock)  # the budget applies once a connection authenticates
        assert isinstance(hello, Hello)
        sock.sendall(rawwire.auth_frame(hello, None))
        err = rawwire.expect_error(sock)
        assert err.code == ErrorCode.BUSY and "2 connections open" in err.message
        sock.close()
        assert capped.metric("memkv_node_protocol_errors_total", reason="busy") >= 1
    finally:
        for s in held:
            s.close()
    # Room again once those close: the node carries on.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert first.ping() >= 0 and second.ping() >= 0
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    first.close()
    second.close()
