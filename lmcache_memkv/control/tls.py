"""Optional TLS for the control plane: the node's certificate, and the CA callers trust.

The node serves TLS when started with ``--tls-cert/--tls-key``. Callers (clients, and nodes
calling their peers) trust the PEM bundle named by ``MEMKV_TLS_CA``; a node without that
variable trusts its own certificate, which suits one certificate shared by every node.
``MEMKV_TLS_SERVER_NAME`` overrides the name checked against the certificate.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

CA_ENV = "MEMKV_TLS_CA"
SERVER_NAME_ENV = "MEMKV_TLS_SERVER_NAME"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None


def server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key_path, "--tls-key"), _read(cert_path, "--tls-cert"))])


def ca_from_env(env: dict[str, str] | None = None) -> str | None:
    value = (os.environ if env is None else env).get(CA_ENV, "").strip()
    return value or None


def channel_credentials(ca_path: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_path, CA_ENV))


def server_name_override(env: dict[str, str] | None = None) -> str | None:
    value = (os.environ if env is None else env).get(SERVER_NAME_ENV, "").strip()
    return value or None
