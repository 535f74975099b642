"""Transport choice: ``auto`` falls back to TCP (and says why); ``rdma`` never silently means TCP."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest

from lmcache_memkv.adapter.metrics import get_metrics
from lmcache_memkv.adapter.settings import resolve
from lmcache_memkv.client.rdma_client import TransportChooser
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.errors import ConfigError
from lmcache_memkv.transport import rdma
from lmcache_memkv.transport.rdma import rdma_devices


def _has_rdma() -> bool:
    tool = shutil.which("ibv_devices")
    if tool is None:
        return bool(rdma_devices())
    out = subprocess.run([tool], capture_output=True, text=True, timeout=10)
    return len(out.stdout.strip().splitlines()) > 2  # header lines only: no device


no_rdma_here = pytest.mark.skipif(_has_rdma(), reason="this host has an RDMA device")


@no_rdma_here
def test_auto_and_tcp_choose_tcp_here() -> None:
    from lmcache_memkv.adapter.memkv_l2_adapter import _choose_transport

    m = get_metrics()
    assert _choose_transport(resolve({"servers": "h:1", "transport": "tcp"}, env={}), None, m)[:1] == ("tcp",)
    transport, why, chooser = _choose_transport(resolve({"servers": "h:1", "transport": "auto"}, env={}), None, m)
    assert (transport, chooser) == ("tcp", None)
    assert "no usable RDMA device" in why  # report_status() says why auto meant TCP


@no_rdma_here
def test_rdma_without_a_device_fails_at_start_up() -> None:
    from lmcache_memkv.adapter.memkv_l2_adapter import _choose_transport

    assert rdma_devices() == []
    with pytest.raises(ConfigError, match="no usable RDMA device"):
        _choose_transport(resolve({"servers": "h:1", "transport": "rdma"}, env={}), None, get_metrics())


def test_rdma_without_an_l1_pool_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device alone is not enough: with no L1 pool to register, rdma refuses and auto is TCP."""
    from lmcache_memkv.adapter import memkv_l2_adapter as mod

    monkeypatch.setattr(rdma, "rdma_devices", lambda wanted=(): ["rxe0"])
    with pytest.raises(ConfigError, match="no L1 memory descriptor"):
        mod._choose_transport(resolve({"servers": "h:1", "transport": "rdma"}, env={}), None, get_metrics())
    transport, why, _ = mod._choose_transport(resolve({"servers": "h:1"}, env={}), None, get_metrics())
    assert transport == "tcp" and "L1" in why


def test_rdma_device_that_will_not_open_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache_memkv.adapter import memkv_l2_adapter as mod

    monkeypatch.setattr(rdma, "rdma_devices", lambda wanted=(): ["mlx5_9"])

    def refuse(*args: object, **kwargs: object) -> None:
        raise rdma.RdmaError("RDMA device 'mlx5_9' cannot be opened: gone")

    monkeypatch.setattr("lmcache_memkv.client.rdma_client.RdmaSide.__init__", refuse)
    l1 = SimpleNamespace(ptr=4096, size=1 << 20)
    with pytest.raises(ConfigError, match=r"mlx5_9.*cannot be opened"):
        mod._choose_transport(resolve({"servers": "h:1", "transport": "rdma"}, env={}), l1, get_metrics())  # type: ignore[arg-type]


def _member(transports: tuple[str, ...]) -> Member:
    return Member("n1", 1, State.ALIVE, "127.0.0.1:9900", "127.0.0.1:9901", transports)


def test_chooser_picks_rdma_only_where_the_node_advertises_it() -> None:
    side = SimpleNamespace()  # never touched: choosing is a pure decision
    auto = TransportChooser(side, None, require=False)  # type: ignore[arg-type]
    assert auto.transport_for(_member(("rdma", "tcp"))) == "rdma"
    assert auto.transport_for(_member(("tcp",))) == "tcp"
    strict = TransportChooser(side, None, require=True)  # type: ignore[arg-type]
    assert strict.transport_for(_member(("tcp",))) == "rdma"  # and its Hello then fails, naming why
    assert TransportChooser(None, None, require=False).transport_for(_member(("rdma", "tcp"))) == "tcp"
    with pytest.raises(ValueError):
        TransportChooser(None, None, require=True)


def test_env_devices_and_no_pyverbs_import_without_verbs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rdma.env_devices({"MEMKV_RDMA_DEVICES": " rxe0, mlx5_1 ,"}) == ("rxe0", "mlx5_1")
    assert rdma.env_devices({}) == ()
    monkeypatch.setattr(rdma, "_SYSFS", "/nonexistent/infiniband")
    import sys

    monkeypatch.delitem(sys.modules, "pyverbs.device", raising=False)
    assert rdma.rdma_devices() == []
    assert "pyverbs.device" not in sys.modules  # the TCP path never loads pyverbs


def test_buffer_address_of_views() -> None:
    import ctypes

    buf = bytearray(64)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert rdma.buffer_address(memoryview(buf)[8:24]) == (base + 8, 16)
    assert rdma.buffer_address(memoryview(bytes(16)))[1] == 16  # read-only buffers too
