"""``lmcache_memkv.node.launcher``: the library way to run a real ``memkv node``."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from lmcache_memkv.client import NodeClient
from lmcache_memkv.node.launcher import NodeProcess, parse_ready_line


def test_parse_ready_line_any_field_order() -> None:
    node_id, fields = parse_ready_line(
        "memkv node host-1 ready pid=42 control=127.0.0.1:9901 data=127.0.0.1:9900 metrics=127.0.0.1:9910\n"
    )
    assert node_id == "host-1"
    assert fields == {"pid": "42", "control": "127.0.0.1:9901", "data": "127.0.0.1:9900", "metrics": "127.0.0.1:9910"}
    with pytest.raises(ValueError):
        parse_ready_line("memkv node x listening")


def test_start_serves_and_stop_drains(tmp_path: Path) -> None:
    with NodeProcess.start(capacity="16MiB", log_dir=tmp_path) as node:
        assert node.alive() and node.pid == int(node.fields["pid"])
        assert node.data.startswith("127.0.0.1:") and node.metrics and node.control
        with NodeClient(node.data) as client:
            assert client.ping() >= 0
        assert node.stop() == 0  # SIGTERM: a clean drain
        assert not node.alive()
        assert node.stop() == 0  # idempotent
    assert node.log_path.parent == tmp_path and "shutting down" in node.log()


def test_kill_and_new_session(tmp_path: Path) -> None:
    node = NodeProcess.start(capacity="16MiB", metrics=False, log_dir=tmp_path, new_session=True)
    try:
        assert node.metrics is None
        assert node.kill() == -signal.SIGKILL
    finally:
        node.stop()


def test_start_failure_raises_with_the_log(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with 2 before ready"):
        NodeProcess.start(capacity="lots", log_dir=tmp_path)
