"""Start and stop real ``memkv node`` processes for tests (shared by every test module).

Use the ``node_factory`` fixture from ``conftest.py`` in tests; it stops every node it
started, also when the test fails. ``NodeProcess.start`` can be used directly elsewhere,
with ``stop()``/``kill()`` in a ``finally``.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lmcache_memkv.client import NodeClient

_READY_RE = re.compile(r"^memkv node (?P<node_id>.+?) ready (?P<fields>.*)$")
# Environment a developer's shell might carry that would change how a test node behaves.
_SCRUBBED_ENV = ("MEMKV_AUTH_KEY", "MEMKV_LISTEN", "MEMKV_CAPACITY", "MEMKV_NODE_ID", "MEMKV_METRICS_LISTEN", "MEMKV_CONFIG")
_LIVE: set[subprocess.Popen[bytes]] = set()


def memkv_command() -> list[str]:
    """The ``memkv`` console script of this interpreter's environment (module form as fallback)."""
    script = Path(sys.executable).with_name("memkv")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmcache_memkv.cli.main"]


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def parse_ready_line(line: str) -> tuple[str, dict[str, str]]:
    """``memkv node ID ready data=H:P pid=N [k=v ...]`` -> (ID, {k: v}); order-agnostic on purpose."""
    m = _READY_RE.match(line.strip())
    if m is None:
        raise ValueError(f"not a memkv ready line: {line!r}")
    fields = dict(tok.split("=", 1) for tok in m.group("fields").split() if "=" in tok)
    return m.group("node_id"), fields


class NodeProcess:
    """One running ``memkv node`` subprocess, started and ready."""

    def __init__(self, proc: subprocess.Popen[bytes], node_id: str, fields: dict[str, str], log_path: Path) -> None:
        self.proc = proc
        self.node_id = node_id
        self.fields = fields
        self.log_path = log_path
        self.data: str = fields["data"]
        self.metrics: str | None = fields.get("metrics")
        self.control: str | None = fields.get("control")  # appended by the control plane, when present

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(
        cls,
        *,
        capacity: str = "64MiB",
        metrics: bool = True,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        ready_timeout_s: float = 20.0,
    ) -> NodeProcess:
        cmd = [*memkv_command(), "node", "--listen", "127.0.0.1:0", "--capacity", capacity, "--log-level", "info"]
        if metrics:
            cmd += ["--metrics-listen", "127.0.0.1:0"]
        cmd += list(args)
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="memkv-node-"))
        log_path = log_dir / f"node-{time.monotonic_ns()}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=node_env(env))
        _LIVE.add(proc)
        try:
            line = _read_ready_line(proc, ready_timeout_s, log_path)
            node_id, fields = parse_ready_line(line)
            return cls(proc, node_id, fields, log_path)
        except BaseException:
            _kill(proc)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        _LIVE.discard(self.proc)
        return rc

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        return _kill(self.proc)

    def kill(self) -> int:
        return _kill(self.proc)

    # ------------------------------------------------------------------ inspection

    def client(self, key: bytes | None = None, timeout_s: float = 5.0, **kw: int) -> NodeClient:
        return NodeClient(self.data, key=key, timeout_s=timeout_s, **kw)

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.data.rpartition(":")
        return host, int(port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
            if line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m is None or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total


def _read_ready_line(proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    while True:
        if b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            text = line.decode(errors="replace")
            if " ready " in text:
                return text
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"memkv node not ready within {timeout_s}s; log:\n{log_path.read_text(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                rc = proc.wait(5)
                raise RuntimeError(f"memkv node exited with {rc} before ready; log:\n{log_path.read_text(errors='replace')}")
            buf += chunk


def _kill(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()
    _LIVE.discard(proc)
    return rc


@atexit.register
def _kill_leftovers() -> None:
    """Last line of defence: no node outlives the test session."""
    for proc in list(_LIVE):
        _kill(proc)


# What the ``node_factory`` fixture yields: ``NodeProcess.start`` with the test's log directory.
NodeFactory = Callable[..., NodeProcess]
