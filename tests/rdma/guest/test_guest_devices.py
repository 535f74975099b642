"""The device the harness promises exists and is usable, as the verbs tools see it."""

from __future__ import annotations

import subprocess


def test_ibv_devices_lists_the_device(rdma_device: str) -> None:
    out = subprocess.run(["ibv_devices"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert rdma_device in out.split(), out


def test_port_is_active(rdma_device: str) -> None:
    out = subprocess.run(
        ["ibv_devinfo", "-d", rdma_device], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "PORT_ACTIVE" in out, out
