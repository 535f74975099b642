"""Parsing of ``HOST:PORT`` endpoints."""

from __future__ import annotations


def parse_endpoint(text: str, *, field: str = "endpoint") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too); raise ValueError naming ``field``."""
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if sep:
        raise ValueError(f"{field}: {text!r} has a URL scheme; give HOST:PORT without {scheme + '://'!r}, e.g. {rest!r}")
    if "/" in raw or any(c.isspace() for c in raw):
        raise ValueError(f"{field}: invalid address {text!r}, expected HOST:PORT (no path, no spaces)")
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise ValueError(f"{field}: invalid address {text!r}, expected [IPv6]:PORT")
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep:
            raise ValueError(f"{field}: invalid address {text!r}, expected HOST:PORT")
    if not host:
        raise ValueError(f"{field}: missing host in {text!r}, expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{field}: invalid port in {text!r}, expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{field}: port {port} out of range 0-65535")
    return host, port


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_servers(text: str) -> list[str]:
    """A comma-separated list of endpoints, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]
