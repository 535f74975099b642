"""Real ``memkv node`` processes for tests: the package's launcher plus test-side inspection.

Use the ``node_factory`` fixture from ``conftest.py`` in tests; it stops every node it
started, also when the test fails. ``NodeProcess.start`` can be used directly elsewhere,
with ``stop()``/``kill()`` in a ``finally`` (or as a context manager).
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmcache_memkv.client import NodeClient
from lmcache_memkv.node import launcher
from lmcache_memkv.node.launcher import memkv_command, node_env, parse_ready_line

__all__ = ["NodeFactory", "NodeProcess", "memkv_command", "node_env", "parse_ready_line"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class NodeProcess(launcher.NodeProcess):
    """A started, ready node: ``.data``, ``.metrics``, ``.control``, ``.pid``, ``.stop()``, ``.kill()``."""

    @classmethod
    def start(cls, **kw: Any) -> NodeProcess:
        node = super().start(**kw)
        assert isinstance(node, cls)
        return node

    def client(self, key: bytes | None = None, timeout_s: float = 5.0, **kw: int) -> NodeClient:
        return NodeClient(self.data, key=key, timeout_s=timeout_s, **kw)

    def rss_kib(self) -> int:
        """Resident set size from /proc/PID/status (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def scrape(self) -> str:
        if self.metrics is None:
            raise RuntimeError("node started without --metrics-listen")
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        total = 0.0
        for line in self.scrape().splitlines():
            m = _SAMPLE.match(line)
            if m is None or m.group(1) != name:
                continue
            got = dict(_LABEL.findall(m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total


# What the ``node_factory`` fixture yields: ``NodeProcess.start`` with the test's log directory.
NodeFactory = Callable[..., NodeProcess]
