"""Network namespaces for tests: one per node, joined by a bridge, with per-link faults.

``Fabric`` builds (and, in ``close``, removes) a private topology:

- a hub namespace holding a bridge;
- one namespace per node, each with a veth to the bridge and a TEST-NET address (x.1, x.2,
  ...: 192.0.2.0/24, or 198.51.100.0/24 where the host itself already uses the first, as some
  sandboxes do);
- a veth from the test's own namespace to the bridge (x.100), so the test process and the
  clients it runs reach every node.

Deleting a namespace deletes the veths in it and so their peers: ``close`` removes everything
the fabric made, also after a failed start. Faults are nftables rules inside a node's namespace
(``drop_to``: that node's packets to one peer are dropped, the other direction still flows).

Needs root, ``ip`` (iproute2) and ``nft`` (nftables); ``unavailable()`` says which is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

TEST_NETS = ("192.0.2", "198.51.100")  # TEST-NET-1 and -2 (RFC 5737): never routed on the internet


def free_test_net() -> str | None:
    """A TEST-NET /24 the host has no route to yet (so the fabric's cannot clash with it)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, timeout=10).stdout
    return next((net for net in TEST_NETS if f"{net}." not in routes), None)


def unavailable() -> str | None:
    """Why a fabric cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install {package})"
    if free_test_net() is None:
        return "the host already routes every TEST-NET range the harness may use"
    return None


def _run(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")


class Fabric:
    def __init__(self, nodes: int, prefix: str | None = None) -> None:
        # Short, per-process names: interface names are at most 15 bytes.
        self.prefix = prefix or f"mk{os.getpid() % 100000}"
        self.hub = f"{self.prefix}hub"
        self.names = [f"{self.prefix}n{i}" for i in range(1, nodes + 1)]
        self._made: list[str] = []
        net = free_test_net()
        if net is None:
            raise RuntimeError("no free TEST-NET range")
        self.net = net
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def address(self, index: int) -> str:
        """The TEST-NET address of node ``index`` (0-based)."""
        return f"{self.net}.{index + 1}"

    def exec_prefix(self, index: int) -> list[str]:
        """Run a command in node ``index``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.names[index]]

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            self._add_ns(ns)
            inside, port = f"{self.prefix}v{i + 1}", f"{self.prefix}b{i + 1}"
            _run("ip", "link", "add", inside, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.hub)
            _run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inside)
            _run("ip", "-n", ns, "link", "set", inside, "up")
        host, port = f"{self.prefix}h", f"{self.prefix}bh"
        _run("ip", "link", "add", host, "type", "veth", "peer", "name", port, "netns", self.hub)
        self._host_link = host
        _run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
        _run("ip", "addr", "add", f"{self.net}.100/24", "dev", host)
        _run("ip", "link", "set", host, "up")

    def drop_to(self, src: int, dst: int) -> None:
        """Drop every packet node ``src`` sends to node ``dst`` (one direction only)."""
        ns = self.names[src]
        _run("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "memkvtest")
        _run(
            "ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "memkvtest", "out",
            "{ type filter hook output priority 0 ; }",
        )
        _run("ip", "netns", "exec", ns, "nft", "add", "rule", "inet", "memkvtest", "out", "ip", "daddr", self.address(dst), "drop")

    def close(self) -> None:
        """Remove every namespace made (their veths go with them, the host's end too)."""
        errors: list[str] = []
        for ns in reversed(self._made):
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=10)
            if proc.returncode != 0:
                errors.append(proc.stderr.strip())
        self._made = []
        if errors:
            raise RuntimeError("could not remove namespaces: " + "; ".join(errors))

    def leftovers(self) -> Sequence[str]:
        """Namespaces of this fabric still present (for the test's own cleanup check)."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.prefix)]
