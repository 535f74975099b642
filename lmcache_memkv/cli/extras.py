"""What a command needs beyond the base (memory-host) install, checked without importing it."""

from __future__ import annotations

import importlib.util

import typer

SIDECAR_INSTALL = 'pip install "lmcache-memkv[sidecar]"  (from a checkout: pip install ".[sidecar]")'


def require_lmcache(command: str) -> None:
    """Exit 2 with one line naming the extra when LMCache is not installed (a memory host's install)."""
    if importlib.util.find_spec("lmcache") is None:
        typer.echo(f"memkv {command}: needs LMCache, which this install lacks; {SIDECAR_INSTALL}", err=True)
        raise typer.Exit(2)
