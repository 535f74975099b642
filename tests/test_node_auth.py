"""Mutual HMAC challenge-response on the data plane: good, missing and wrong keys, key file, pre-auth
requests, and a client that refuses keyless and impostor nodes."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import rawwire
from nodeproc import NodeFactory, memkv_command, node_env

from lmcache_memkv.client import NodeClient
from lmcache_memkv.errors import AuthError
from lmcache_memkv.wire.constants import ErrorCode
from lmcache_memkv.wire.messages import AuthOk, Hello, PutRequest, encode

KEY_HEX = "ab" * 32
KEY = bytes.fromhex(KEY_HEX)


def test_key_from_env(node_factory: NodeFactory) -> None:
    node = node_factory(env={"MEMKV_AUTH_KEY": KEY_HEX})
    with node.client(key=KEY) as good:
        assert good.put([b"k"], [b"secret"]) == [0]

    with node.client(key=None) as anon, pytest.raises(AuthError, match=rf"memkv node {node.data} requires an auth key"):
        anon.exists([b"k"])
    with node.client(key=b"\x00" * 32) as wrong, pytest.raises(AuthError, match="rejected our credentials"):
        wrong.exists([b"k"])

    # The refused clients changed nothing, the good one carries on, and the node counted and logged them.
    with node.client(key=KEY) as good:
        buf = bytearray(6)
        assert good.get_into([b"k"], [buf]) == [6] and buf == b"secret"
    assert node.metric("memkv_node_auth_failures_total") == 2
    log = node.log()
    assert "auth failure" in log and "wrong auth key" in log and "requires an auth key" in log


def test_key_from_file(node_factory: NodeFactory, tmp_path: Path) -> None:
    key_file = tmp_path / "memkv.key"
    key_file.write_text(KEY_HEX + "\n")
    node = node_factory(args=["--auth-key-file", str(key_file)])
    with node.client(key=KEY) as c:
        assert c.ping() > 0
    with node.client() as c, pytest.raises(AuthError):
        c.ping()
    assert node.metric("memkv_node_auth_failures_total") == 1


def test_requests_before_auth_are_refused_and_do_nothing(node_factory: NodeFactory) -> None:
    node = node_factory(env={"MEMKV_AUTH_KEY": KEY_HEX})
    sock = socket.create_connection(node.address, timeout=5)
    try:
        _, hello, _ = rawwire.read_frame(sock)
        assert isinstance(hello, Hello) and hello.auth_required
        sock.sendall(encode(PutRequest(keys=[b"sneaky"], sizes=[3], versions=[1]), 1) + b"abc")  # skip AUTH
        assert rawwire.expect_error(sock).code == ErrorCode.AUTH_REQUIRED
    finally:
        sock.close()
    # A replayed proof for another connection's nonce is just a wrong proof.
    sock = socket.create_connection(node.address, timeout=5)
    try:
        rawwire.read_frame(sock)
        sock.sendall(rawwire.auth_frame(hello, KEY))  # made for the first connection's challenge
        assert rawwire.expect_error(sock).code == ErrorCode.AUTH_FAILED
    finally:
        sock.close()
    with node.client(key=KEY) as c:
        assert c.exists([b"sneaky"]) == [None]
    assert node.metric("memkv_node_auth_failures_total") == 2


def test_keyed_client_refuses_a_keyless_node(node_factory: NodeFactory) -> None:
    """No downgrade: a node that needs no key cannot prove one, so a client holding the key
    refuses it before sending anything (a keyless node may be an impostor)."""
    node = node_factory()
    with node.client() as c:
        assert c.ping() > 0
    with node.client(key=KEY) as c, pytest.raises(AuthError, match="needs no auth key, but this client has one"):
        c.put([b"secret"], [b"kv bytes"])
    with node.client() as c:
        assert c.exists([b"secret"]) == [None]  # nothing reached it
    assert node.metric("memkv_node_auth_failures_total") == 0


def test_keyed_client_refuses_an_impostor_node() -> None:
    """An impostor that claims to need the key and waves any proof through cannot answer the
    client's challenge: the client refuses it and sends it no request, no value byte.

    The impostor is a test-side socket server: no real node behaves like this on demand.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(encode(Hello(node_id="n1", auth_required=True, nonce=os.urandom(32)), 0))
            conn.settimeout(5)
            received.extend(conn.recv(4096))  # the AUTH
            conn.sendall(encode(AuthOk(proof=os.urandom(32)), 0))
            try:
                while chunk := conn.recv(65536):
                    received.extend(chunk)
            except OSError:
                pass

    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    host, port = listener.getsockname()
    try:
        with NodeClient(f"{host}:{port}", key=KEY, timeout_s=5) as c, pytest.raises(AuthError, match="could not prove"):
            c.put([b"secret"], [b"kv bytes" * 1000])
        t.join(5)
    finally:
        listener.close()
    assert b"kv bytes" not in received and b"secret" not in received


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"MEMKV_AUTH_KEY": "abc"}, [], "MEMKV_AUTH_KEY: the auth key must be 64 hex characters"),
        ({"MEMKV_AUTH_KEY": "zz" * 32}, [], "hex digits only"),
        ({}, ["--auth-key-file", "/nonexistent/memkv.key"], "--auth-key-file: cannot read /nonexistent/memkv.key"),
    ],
)
def test_bad_keys_fail_at_start_with_a_clear_message(env: dict[str, str], args: list[str], message: str) -> None:
    cmd = [*memkv_command(), "node", "--listen", "127.0.0.1:0", "--capacity", "1MiB", *args]
    proc = subprocess.run(cmd, env=node_env(env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr
