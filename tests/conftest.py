"""Shared fixtures: real node processes (see ``nodeproc.py``) and raw wire helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from nodeproc import NodeFactory, NodeProcess

from lmcache_memkv.sidecar.process import SidecarConfig, SidecarError, SidecarProcess

# Node subprocesses inherit these too (nodeproc sets them again, explicitly).
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")

# Fuzzing budget: enough examples to find framing bugs, small enough for a 2-core CI box.
settings.register_profile("memkv", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# HYPOTHESIS_PROFILE=fuzz: a long run of the codec fuzzers before changing the wire format.
settings.register_profile("fuzz", max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "memkv"))

# tests/rdma/guest/ needs a verbs device: tests/rdma/test_rdma_suite.py runs it inside the
# soft-RoCE guest (or on the host's device), which sets MEMKV_RDMA_GUEST_TESTS. (No conftest.py in
# tests/rdma: it would shadow this module for the tests that `from conftest import ...`.)
collect_ignore = [] if os.environ.get("MEMKV_RDMA_GUEST_TESTS") == "1" else ["rdma/guest"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # -q hides skip reasons; this one matters (RDMA untested), so say it in one line.
    for rep in terminalreporter.stats.get("skipped", []):
        if "test_rdma_suite.py" in rep.nodeid and isinstance(rep.longrepr, tuple):
            reason = rep.longrepr[2].removeprefix("Skipped: ")
            terminalreporter.write_line(f"RDMA tests skipped: {reason}", yellow=True)

@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes with ``node_factory(capacity=..., args=[...], env={...})``; all are stopped afterwards."""
    started: list[NodeProcess] = []

    def start(**kw: Any) -> NodeProcess:
        kw.setdefault("log_dir", tmp_path)
        node = NodeProcess.start(**kw)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.stop()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node per test module, for tests that do not care about each other's keys."""
    node = NodeProcess.start(capacity="128MiB", log_dir=tmp_path_factory.mktemp("node"))
    try:
        yield node
    finally:
        node.stop()


SidecarFactory = Callable[..., SidecarProcess]


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[SidecarFactory]:
    """``sidecar_factory(config)`` starts an ``lmcache server``; every one is stopped afterwards, also on failure."""
    started: list[SidecarProcess] = []

    def start(config: SidecarConfig, **kw: Any) -> SidecarProcess:
        sidecar = SidecarProcess(config, log_dir=tmp_path / "logs", **kw)
        started.append(sidecar)
        return sidecar.start()

    try:
        yield start
    finally:
        for sidecar in started:
            sidecar.stop()
            with contextlib.suppress(SidecarError):  # shown by pytest when the test failed
                print(f"sidecar log: {sidecar.log_path}")
