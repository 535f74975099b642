"""Start a real ``memkv node`` subprocess and wait for its ready line.

Used by ``memkv demo``, the benchmarks and the tests. The node prints one parseable line once
both planes listen::

    memkv node ID ready data=H:P pid=N control=H:P [metrics=H:P]

``NodeProcess.start(...)`` returns only after that line (or raises with the node's log), and
``stop()`` is SIGTERM with a SIGKILL fallback, so a caller with a ``finally`` (or ``with``)
never leaves a node behind. An ``atexit`` hook kills whatever is still running when the
interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["NodeProcess", "memkv_command", "node_env", "parse_ready_line"]

_READY_RE = re.compile(r"^memkv node (?P<node_id>.+?) ready (?P<fields>.*)$")
# Settings a caller's shell might carry that would silently change how a launched node behaves;
# callers who want one pass it explicitly through ``env``.
_SCRUBBED_ENV = (
    "MEMKV_AUTH_KEY",
    "MEMKV_AUTH_KEY_FILE",
    "MEMKV_LISTEN",
    "MEMKV_CAPACITY",
    "MEMKV_NODE_ID",
    "MEMKV_METRICS_LISTEN",
    "MEMKV_CONFIG",
    "MEMKV_NODE_CONFIG",
    "MEMKV_SEED",
    "MEMKV_CONTROL_LISTEN",
    "MEMKV_LOG_LEVEL",
    "MEMKV_ADVERTISE_HOST",
    "MEMKV_TLS_CERT",
    "MEMKV_TLS_KEY",
    "MEMKV_CLUSTER_ID",
    "MEMKV_REAP_AFTER",
    "MEMKV_INDIRECT_PROBES",
    "MEMKV_HEARTBEAT_INTERVAL",
    "MEMKV_SUSPECT_AFTER",
    "MEMKV_DEAD_AFTER",
)
_LIVE: set[subprocess.Popen[bytes]] = set()


def memkv_command() -> list[str]:
    """The ``memkv`` console script of this interpreter's environment (module form as fallback)."""
    script = Path(sys.executable).with_name("memkv")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmcache_memkv.cli.main"]


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus node settings, plus quiet LMCache defaults and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def parse_ready_line(line: str) -> tuple[str, dict[str, str]]:
    """``memkv node ID ready data=H:P pid=N [k=v ...]`` -> (ID, {k: v}); field order does not matter."""
    m = _READY_RE.match(line.strip())
    if m is None:
        raise ValueError(f"not a memkv ready line: {line!r}")
    fields = dict(tok.split("=", 1) for tok in m.group("fields").split() if "=" in tok)
    if "data" not in fields:
        raise ValueError(f"memkv ready line without data=H:P: {line!r}")
    return m.group("node_id"), fields


class NodeProcess:
    """One running ``memkv node`` subprocess, started and ready.

    Usage::

        with NodeProcess.start(capacity="256MiB") as node:
            print(node.data, node.control, node.metrics)
    """

    def __init__(self, proc: subprocess.Popen[bytes], node_id: str, fields: dict[str, str], log_path: Path) -> None:
        self.proc = proc
        self.node_id = node_id
        self.fields = fields
        self.log_path = log_path
        self.data: str = fields["data"]
        self.control: str | None = fields.get("control")
        self.metrics: str | None = fields.get("metrics")

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
        new_session: bool = False,
        wrap: Sequence[str] = (),
        listen: str = "127.0.0.1:0",
    ) -> NodeProcess:
        """Start ``memkv node`` on free loopback ports (``args`` may override) and wait until ready.

        ``new_session`` puts the node in its own session, so a terminal Ctrl-C reaches only the
        caller, which then stops everything in order. ``wrap`` runs the node under a command
        (``ip netns exec NS``: one that execs it, so ``pid`` and signals reach the node).
        Raises ``TimeoutError`` or ``RuntimeError`` carrying the node's log when it does not come up.
        """
        cmd = [*wrap, *memkv_command(), "node", "--listen", listen, "--capacity", capacity, "--log-level", "info"]
        if metrics:
            cmd += ["--metrics-listen", "127.0.0.1:0"]
        cmd += list(args)
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="memkv-node-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"node-{time.monotonic_ns()}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=node_env(env),
                start_new_session=new_session,
            )
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
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for exit (``subprocess.TimeoutExpired`` if it does not); returns the exit code."""
        rc = self.proc.wait(timeout_s)
        _forget(self.proc)
        return rc

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code. Idempotent."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                return self.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        return _kill(self.proc)

    def kill(self) -> int:
        """SIGKILL now (no drain); returns the exit code."""
        return _kill(self.proc)

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection

    @property
    def address(self) -> tuple[str, int]:
        """The data endpoint as (host, port)."""
        host, _, port = self.data.rpartition(":")
        return host, int(port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))


def _read_ready_line(proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> str:
    # select + os.read rather than readline(): a node that hangs before printing must not hang us.
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
            raise TimeoutError(
                f"memkv node not ready within {timeout_s}s; log:\n{log_path.read_text(errors='replace')}"
            )
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                rc = proc.wait(5)
                raise RuntimeError(
                    f"memkv node exited with {rc} before ready; log:\n{log_path.read_text(errors='replace')}"
                )
            buf += chunk


def _forget(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdout is not None:
        proc.stdout.close()
    _LIVE.discard(proc)


def _kill(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    rc = proc.wait(10)
    _forget(proc)
    return rc


@atexit.register
def _kill_leftovers() -> None:
    """Last line of defence: no node outlives the interpreter that started it."""
    for proc in list(_LIVE):
        with contextlib.suppress(subprocess.TimeoutExpired):
            _kill(proc)
