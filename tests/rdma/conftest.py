"""Host side of the RDMA tests: ``tests/rdma/guest/`` is collected only where the harness runs it
(inside the soft-RoCE guest, or on a host with a real RDMA device); everywhere else
``test_rdma_suite.py`` runs it through ``vm.py`` as one test, or skips it with one line saying why."""

from __future__ import annotations

import os

import pytest

collect_ignore = [] if os.environ.get("MEMKV_RDMA_GUEST_TESTS") == "1" else ["guest"]

# Set by test_rdma_suite.py when it skips; printed once at the end of the run.
SKIPPED: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for reason in SKIPPED:
        terminalreporter.write_line(f"RDMA tests skipped: {reason}", yellow=True)
