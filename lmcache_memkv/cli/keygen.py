"""``memkv keygen``: print a fresh shared key."""

from __future__ import annotations

import typer

HELP = "Print a fresh random 64-hex-character auth key for MEMKV_AUTH_KEY."
EXAMPLE = "Example: export MEMKV_AUTH_KEY=$(memkv keygen)"


def keygen() -> None:
    from lmcache_memkv.auth import new_key_hex

    typer.echo(new_key_hex())
