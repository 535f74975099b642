"""Small shared helpers: sizes, endpoints, auth keys and proofs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_memkv import auth
from lmcache_memkv.endpoints import format_endpoint, parse_endpoint, split_servers
from lmcache_memkv.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "n"),
    [("512MiB", 512 << 20), ("64GiB", 64 << 30), ("1.5GB", 1_500_000_000), ("4096", 4096), (" 2 kib ", 2048), (7, 7)],
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(("text", "match"), [("", "invalid size"), ("-1", "invalid size"), ("3 XB", "unit"), (-5, "negative")])
def test_parse_size_errors(text: str | int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(512) == "512 B" and format_size(1 << 20) == "1.0 MiB" and format_size(3 << 40) == "3.0 TiB"


def test_endpoints() -> None:
    assert parse_endpoint("127.0.0.1:9900") == ("127.0.0.1", 9900)
    assert parse_endpoint("[::1]:0") == ("::1", 0)
    assert format_endpoint("::1", 5) == "[::1]:5" and format_endpoint("h", 5) == "h:5"
    assert split_servers(" a:1, ,b:2 ") == ["a:1", "b:2"]
    for bad, match in (("h", "HOST:PORT"), (":5", "missing host"), ("h:x", "invalid port"), ("[::1", "IPv6")):
        with pytest.raises(ValueError, match=match):
            parse_endpoint(bad, field="--seed")


def test_keys_and_proofs(tmp_path: Path) -> None:
    hex_key = auth.new_key_hex()
    key = auth.parse_key(hex_key)
    assert len(key) == auth.KEY_BYTES
    f = tmp_path / "k"
    f.write_text(f"  {hex_key}\n")
    assert auth.load_key(f) == key
    assert auth.load_key(env={"MEMKV_AUTH_KEY": hex_key}) == key
    assert auth.load_key(env={}) is None and auth.load_key(env={"MEMKV_AUTH_KEY": "  "}) is None
    nonce = b"n" * 32
    proof = auth.data_client_proof(key, nonce, b"c" * 32, "n1")
    assert auth.verify(proof, auth.data_client_proof(key, nonce, b"c" * 32, "n1"))
    assert not auth.verify(proof, auth.data_client_proof(key, b"m" * 32, b"c" * 32, "n1"))
    assert not auth.verify(proof, auth.data_client_proof(key, nonce, b"d" * 32, "n1"))
    assert not auth.verify(proof, auth.data_client_proof(key, nonce, b"c" * 32, "n2"))
    assert not auth.verify(proof, auth.data_node_proof(key, nonce, b"c" * 32, "n1"))  # no reflection
    assert not auth.verify(proof, b"")
    with pytest.raises(ValueError, match="64 hex"):
        auth.parse_key("abcd")
