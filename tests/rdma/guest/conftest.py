"""Fixtures for the tests that need a real verbs device (soft-RoCE in the guest, or real hardware).

Everything under ``tests/rdma/guest/`` runs in ONE guest boot (``make test-rdma``, and as
``tests/rdma/test_rdma_suite.py`` in ``make test``); add new RDMA tests here. This directory is
run with ``--confcutdir`` set to it, so ``tests/conftest.py`` (hypothesis, node fixtures) is not
loaded: import what a test needs yourself (``sys.path`` has this directory and ``tests/``).

The harness sets:

- ``MEMKV_RDMA_DEVICE``: the verbs device to use (``rxe0`` in the guest)
- ``MEMKV_RDMA_GID_INDEX``: its GID index (1 in the guest: RoCE v2, ``::ffff:192.0.2.1``)
- ``MEMKV_RDMA_ADDR``: the IPv4 address behind that GID (192.0.2.1 in the guest), when known
- ``MEMKV_RDMA_IN_VM=1`` inside the guest

Keep tests small: the guest runs code 20-30x slower than the host and starts processes 40-60x
slower; soft-RoCE moves tens of MiB/s. Use small values and few keys.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/ on sys.path, as tests/conftest.py would have it, for helpers such as nodeproc.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("MEMKV_RDMA_DEVICE"):
        skip = pytest.mark.skip(reason="no MEMKV_RDMA_DEVICE: run these through `make test-rdma`")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rdma_device() -> str:
    """Name of the verbs device under test."""
    return os.environ["MEMKV_RDMA_DEVICE"]


@pytest.fixture(scope="session")
def rdma_gid_index() -> int:
    """GID index to address the device with (RoCE v2 over IPv4 where there is one)."""
    return int(os.environ.get("MEMKV_RDMA_GID_INDEX", "0"))


@pytest.fixture(scope="session")
def rdma_addr() -> str:
    """IPv4 address of the device's netdev (for tests that need one besides 127.0.0.1)."""
    addr = os.environ.get("MEMKV_RDMA_ADDR")
    if not addr:
        pytest.skip("MEMKV_RDMA_ADDR not set (no IPv4 GID found for the device)")
    return addr
