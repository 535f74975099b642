"""Transport choice: ``auto`` falls back to TCP; ``rdma`` never silently means TCP."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lmcache_memkv.adapter.settings import resolve
from lmcache_memkv.errors import ConfigError
from lmcache_memkv.transport.rdma import rdma_devices


def _has_rdma() -> bool:
    tool = shutil.which("ibv_devices")
    if tool is None:
        return bool(rdma_devices())
    out = subprocess.run([tool], capture_output=True, text=True, timeout=10)
    return len(out.stdout.strip().splitlines()) > 2  # header lines only: no device


def test_auto_and_tcp_choose_tcp_here() -> None:
    from lmcache_memkv.adapter.memkv_l2_adapter import _choose_transport

    assert _choose_transport(resolve({"servers": "h:1", "transport": "tcp"}, env={})) == "tcp"
    assert _choose_transport(resolve({"servers": "h:1", "transport": "auto"}, env={})) == "tcp"


@pytest.mark.skipif(_has_rdma(), reason="this host has an RDMA device")
def test_rdma_without_a_device_fails_at_start_up() -> None:
    from lmcache_memkv.adapter.memkv_l2_adapter import _choose_transport

    assert rdma_devices() == []
    with pytest.raises(ConfigError, match="no usable RDMA device"):
        _choose_transport(resolve({"servers": "h:1", "transport": "rdma"}, env={}))
