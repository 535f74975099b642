"""Run a real ``lmcache server`` (the sidecar) as a subprocess and watch it over its admin HTTP port.

``SidecarProcess`` owns the process (ports, log file, start-up wait, SIGTERM/SIGKILL stop);
``SidecarAdmin`` is the admin-port client (``/status``, ``/metrics``) and also works against a
sidecar this module did not start. Only the standard library is used here, so importing this
module is cheap; the data path lives in ``workload.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "LOOPBACK",
    "SIDECAR_ENV",
    "SidecarAdmin",
    "SidecarConfig",
    "SidecarEndpoints",
    "SidecarError",
    "SidecarProcess",
    "SidecarStartError",
    "StoreBacklog",
    "free_loopback_port",
    "lmcache_command",
    "parse_metric_value",
]

LOOPBACK = "127.0.0.1"
# Always set for the child: usage telemetry would try the network, the banner spams the log.
SIDECAR_ENV: Mapping[str, str] = {"LMCACHE_TRACK_USAGE": "false", "LMCACHE_DISABLE_BANNER": "1"}
# A developer's shell may carry LMCache settings that would silently change the sidecar's behaviour.
_SCRUBBED_ENV = ("LMCACHE_MP_TRANSFER_MODE", "LMCACHE_COORDINATOR_URL", "LMCACHE_COORDINATOR_EVENT_REPORTING")
_PORT_IN_USE_MARKERS = ("address already in use", "errno 98", "address in use")
# Process groups this interpreter started (sidecars and vLLM workers), killed at exit if still up.
LIVE_GROUPS: set[subprocess.Popen[bytes]] = set()


class SidecarError(RuntimeError):
    """The sidecar did something the harness did not expect."""


class SidecarStartError(SidecarError):
    """The sidecar exited or never became ready; the message carries the log tail."""


def lmcache_command() -> list[str]:
    """The ``lmcache`` console script of this interpreter's environment (module form as fallback)."""
    script = Path(sys.executable).with_name("lmcache")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmcache.cli.main"]


def free_loopback_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def parse_metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``, from Prometheus text.

    ``name`` may be given with or without the ``_total`` suffix of a counter. Returns 0.0 when no
    sample matches: LMCache's OpenTelemetry counters only appear after their first increment.
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {name} if name.endswith("_total") else {name, f"{name}_total"}
    want_labels = dict(labels or {})
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and all(sample.labels.get(k) == v for k, v in want_labels.items()):
                total += float(sample.value)
    return total


@dataclass(frozen=True)
class SidecarEndpoints:
    """Where a sidecar listens: the MP request port (ZMQ) and the admin HTTP port."""

    host: str
    rpc_port: int
    http_port: int

    @property
    def rpc_url(self) -> str:
        """The ZMQ request endpoint, as LMCache's MP clients spell it."""
        return f"tcp://{self.host}:{self.rpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


@dataclass(frozen=True)
class StoreBacklog:
    """Work the sidecar's L1 -> L2 store controllers still hold (summed over all L1 tiers)."""

    pending_keys: int
    in_flight_tasks: int

    @property
    def idle(self) -> bool:
        return self.pending_keys == 0 and self.in_flight_tasks == 0


class SidecarAdmin:
    """Client for a sidecar's admin HTTP port (``/status``, ``/metrics``)."""

    def __init__(self, admin_url: str, timeout_s: float = 5.0) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, timeout_s: float | None = None) -> bytes:
        with urllib.request.urlopen(self.admin_url + path, timeout=timeout_s or self.timeout_s) as resp:
            body: bytes = resp.read()
            return body

    def status(self) -> dict[str, Any]:
        """``GET /status``: LMCache's ``report_status()`` of the whole engine, as a dict."""
        data = json.loads(self._get("/status"))
        if not isinstance(data, dict):
            raise SidecarError(f"/status returned {type(data).__name__}, not an object")
        return data

    def metrics_text(self) -> str:
        """``GET /metrics``: Prometheus text exposition."""
        return self._get("/metrics").decode()

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one metric (summed over matching label sets; 0.0 when absent)."""
        return parse_metric_value(self.metrics_text(), name, labels)

    def chunk_size(self) -> int:
        return int(self.status()["chunk_size"])

    def store_backlog(self) -> StoreBacklog:
        """Keys waiting for, and tasks running in, the store controllers (L1 -> L2 write-behind)."""
        sm = self.status().get("storage_manager", {})
        # Newer LMCache reports one controller per L1 tier; the single-controller key is the fallback.
        controllers = sm.get("store_controllers") or {"_default": sm.get("store_controller") or {}}
        pending = sum(int(c.get("pending_keys_count", 0)) for c in controllers.values())
        in_flight = sum(int(c.get("in_flight_task_count", 0)) for c in controllers.values())
        return StoreBacklog(pending_keys=pending, in_flight_tasks=in_flight)

    def wait_store_drained(self, timeout_s: float = 30.0, poll_s: float = 0.02, stable_polls: int = 3) -> float:
        """Wait until every store controller is idle; returns the seconds waited.

        The controller pops its pending keys before it counts the task as in flight, so a single
        idle reading can fall into that gap: idle must be seen ``stable_polls`` times in a row.
        Raises ``TimeoutError`` with the last backlog when the bound passes.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        streak = 0
        backlog = StoreBacklog(-1, -1)
        while True:
            backlog = self.store_backlog()
            streak = streak + 1 if backlog.idle else 0
            if streak >= stable_polls:
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise TimeoutError(f"store controller not drained within {timeout_s}s: {backlog}")
            time.sleep(poll_s)

    def wait_events_settled(self, timeout_s: float = 5.0, poll_s: float = 0.02, stable_polls: int = 3) -> float:
        """Wait until LMCache's observability event bus is empty; returns the seconds waited.

        Counters on ``/metrics`` are fed asynchronously from that bus, so read them after this
        when exact values matter. Returns at once when the server exposes no bus gauge.
        """
        started = time.monotonic()
        streak = 0
        while True:
            text = self.metrics_text()
            if "lmcache_mp_event_bus_queue_depth" not in text:
                return 0.0
            streak = streak + 1 if parse_metric_value(text, "lmcache_mp_event_bus_queue_depth") == 0 else 0
            if streak >= stable_polls:
                return time.monotonic() - started
            if time.monotonic() - started >= timeout_s:
                raise TimeoutError(f"LMCache event bus not empty within {timeout_s}s")
            time.sleep(poll_s)

    def wait_metric(self, name: str, at_least: float, timeout_s: float = 10.0, **labels: str) -> float:
        """Wait until a metric reaches ``at_least``; returns its value (raises ``TimeoutError``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.metric(name, **labels)
            if value >= at_least:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{name}{labels or ''} is {value}, not >= {at_least} after {timeout_s}s")
            time.sleep(0.05)

    def l1_usage(self) -> tuple[int, int]:
        """(used bytes, total bytes) of L1, summed over all L1 tiers."""
        sm = self.status().get("storage_manager", {})
        managers = sm.get("l1_managers") or {"_default": sm.get("l1_manager") or {}}
        used = sum(int(m.get("memory_used_bytes", 0)) for m in managers.values())
        total = sum(int(m.get("memory_total_bytes", 0)) for m in managers.values())
        return used, total

    def clear_l1(self, force: bool = False) -> None:
        """``POST /cache/clear``: drop L1's unlocked objects (L2 keeps its copies), so what is
        read next must come from L2. ``force`` also drops locked ones (in-flight work may break)."""
        body = json.dumps({"tier": "l1", "force": force}).encode()
        request = urllib.request.Request(
            self.admin_url + "/cache/clear", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
            reply = json.loads(resp.read())
        if not isinstance(reply, dict) or reply.get("status") != "ok":
            raise SidecarError(f"/cache/clear answered {reply!r}")

    def l1_object_count(self) -> int:
        sm = self.status().get("storage_manager", {})
        managers = sm.get("l1_managers") or {"_default": sm.get("l1_manager") or {}}
        return sum(int(m.get("total_object_count", 0)) for m in managers.values())

    def wait_l1_usage_below(self, ratio: float, timeout_s: float = 10.0, poll_s: float = 0.1) -> float:
        """Wait until L1 usage is below ``ratio`` of its capacity; returns the seconds waited.

        LMCache's L1 eviction loop wakes once a second, so a burst of stores can fill L1 before
        it runs; callers that want headroom (not back-pressure) wait here between bursts.
        """
        started = time.monotonic()
        while True:
            used, total = self.l1_usage()
            if total <= 0 or used < ratio * total:
                return time.monotonic() - started
            if time.monotonic() - started >= timeout_s:
                raise TimeoutError(f"L1 usage {used}/{total} not below {ratio:.2f} within {timeout_s}s")
            time.sleep(poll_s)

    def ready(self, require_healthy: bool = True) -> bool:
        """Whether ``/status`` answers (and, with ``require_healthy``, reports a healthy engine:
        a degraded memkv adapter, still looking for its cluster, reports unhealthy but serves)."""
        try:
            status = json.loads(self._get("/status", timeout_s=2.0))
            return bool(status.get("is_healthy")) or (not require_healthy and isinstance(status, dict))
        except (OSError, ValueError, AttributeError):
            return False


@dataclass(frozen=True)
class SidecarConfig:
    """How to start ``lmcache server``. Ports left ``None`` are picked free on 127.0.0.1.

    ``eviction_trigger_watermark``/``eviction_ratio`` left ``None`` keep LMCache's defaults
    (0.8/0.2). ``supported_transfer_mode`` ``None`` keeps LMCache's default (``lmcache_driven``,
    which is what the CPU-mode SHM client uses).
    """

    l2_adapters: Sequence[Mapping[str, Any]] = ()
    l1_size_gb: float = 0.25
    chunk_size: int = 256
    eviction_policy: str = "LRU"
    eviction_trigger_watermark: float | None = None
    eviction_ratio: float | None = None
    supported_transfer_mode: str | None = None
    rpc_port: int | None = None
    http_port: int | None = None
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Snapshot caller-owned containers: the config must not change under a running sidecar.
        object.__setattr__(self, "l2_adapters", tuple(dict(a) for a in self.l2_adapters))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "env", dict(self.env))
        if self.l1_size_gb <= 0:
            raise ValueError(f"l1_size_gb must be > 0, got {self.l1_size_gb}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}")
        for name in ("eviction_trigger_watermark", "eviction_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for adapter in self.l2_adapters:
            if "type" not in adapter:
                raise ValueError(f"L2 adapter spec needs a 'type' field: {adapter!r}")

    def server_args(self, endpoints: SidecarEndpoints) -> list[str]:
        """The ``lmcache server ...`` arguments (without the executable)."""
        args = [
            "server",
            "--host", endpoints.host,
            "--port", str(endpoints.rpc_port),
            "--http-host", endpoints.host,
            "--http-port", str(endpoints.http_port),
            "--chunk-size", str(self.chunk_size),
            "--l1-size-gb", repr(float(self.l1_size_gb)),
            "--eviction-policy", self.eviction_policy,
        ]  # fmt: skip
        if self.eviction_trigger_watermark is not None:
            args += ["--eviction-trigger-watermark", repr(float(self.eviction_trigger_watermark))]
        if self.eviction_ratio is not None:
            args += ["--eviction-ratio", repr(float(self.eviction_ratio))]
        if self.supported_transfer_mode is not None:
            args += ["--supported-transfer-mode", self.supported_transfer_mode]
        for adapter in self.l2_adapters:
            args += ["--l2-adapter", json.dumps(dict(adapter), separators=(",", ":"))]
        args += list(self.extra_args)
        return args


class SidecarProcess:
    """One ``lmcache server`` subprocess bound to 127.0.0.1.

    Usage::

        with SidecarProcess(SidecarConfig(l2_adapters=[{"type": "fs", "base_path": d}])) as sidecar:
            sidecar.status(); sidecar.metric("lmcache_mp_lookup_hit_l2_keys")
    """

    def __init__(
        self,
        config: SidecarConfig | None = None,
        *,
        log_dir: Path | str | None = None,
        ready_timeout_s: float = 90.0,
        command: Sequence[str] | None = None,
        require_healthy: bool = True,
    ) -> None:
        """``require_healthy=False``: ready once ``/status`` answers, healthy or not (a sidecar
        started before its MemKV cluster serves, degraded)."""
        self.config = config or SidecarConfig()
        self.ready_timeout_s = ready_timeout_s
        self.require_healthy = require_healthy
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._command = list(command) if command is not None else lmcache_command()
        self._proc: subprocess.Popen[bytes] | None = None
        self._endpoints: SidecarEndpoints | None = None
        self._admin: SidecarAdmin | None = None
        self._log_path: Path | None = None
        self.returncode: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SidecarProcess:
        """Start the server and wait until ``/status`` reports it healthy (bounded)."""
        if self._proc is not None:
            raise SidecarError("sidecar already started")
        auto_ports = self.config.rpc_port is None or self.config.http_port is None
        attempts = 3 if auto_ports else 1  # a picked port can be taken before the child binds it
        for attempt in range(1, attempts + 1):
            try:
                self._spawn()
                self._wait_ready()
                return self
            except SidecarStartError as exc:
                port_clash = any(m in str(exc).lower() for m in _PORT_IN_USE_MARKERS)
                self._terminate(timeout_s=5.0)
                self._proc = None
                if not (port_clash and attempt < attempts):
                    raise
            except BaseException:
                self._terminate(timeout_s=5.0)
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        cfg = self.config
        self._endpoints = SidecarEndpoints(
            host=LOOPBACK,
            rpc_port=cfg.rpc_port if cfg.rpc_port is not None else free_loopback_port(),
            http_port=cfg.http_port if cfg.http_port is not None else free_loopback_port(),
        )
        self._admin = SidecarAdmin(self._endpoints.admin_url)
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="memkv-sidecar-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = log_dir / f"lmcache-server-{self._endpoints.rpc_port}-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(cfg.env)
        env.update(SIDECAR_ENV)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [*self._command, *cfg.server_args(self._endpoints)]
        with open(self._log_path, "wb") as log:  # the child keeps its own descriptor
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            # Own session: a terminal Ctrl-C reaches the harness, which then stops the sidecar in order,
            # and a SIGKILL fallback can take the whole group (LMCache may start helper processes).
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        LIVE_GROUPS.add(self._proc)
        self.returncode = None

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._admin is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise SidecarStartError(f"lmcache server exited with {rc} before ready; log tail:\n{self.log_tail()}")
            if self._admin.ready(self.require_healthy):
                return
            if time.monotonic() >= deadline:
                raise SidecarStartError(
                    f"lmcache server not ready within {self.ready_timeout_s}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL the process group. Idempotent.

        Returns the exit code (``None`` if it was never started).
        """
        return self._terminate(timeout_s)

    def _terminate(self, timeout_s: float) -> int | None:
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
        self.returncode = proc.wait()
        LIVE_GROUPS.discard(proc)
        return self.returncode

    def __enter__(self) -> SidecarProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection

    @property
    def pid(self) -> int:
        return self._require_proc().pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def endpoints(self) -> SidecarEndpoints:
        if self._endpoints is None:
            raise SidecarError("sidecar not started")
        return self._endpoints

    @property
    def rpc_url(self) -> str:
        """ZMQ endpoint for LMCache's MP clients (``tcp://127.0.0.1:PORT``)."""
        return self.endpoints.rpc_url

    @property
    def admin_url(self) -> str:
        return self.endpoints.admin_url

    @property
    def admin(self) -> SidecarAdmin:
        if self._admin is None:
            raise SidecarError("sidecar not started")
        return self._admin

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise SidecarError("sidecar not started")
        return self._log_path

    def log_tail(self, lines: int = 60) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        with open(self._log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def status(self) -> dict[str, Any]:
        return self.admin.status()

    def metrics_text(self) -> str:
        return self.admin.metrics_text()

    def metric(self, name: str, **labels: str) -> float:
        return self.admin.metric(name, **labels)

    def store_backlog(self) -> StoreBacklog:
        return self.admin.store_backlog()

    def wait_store_drained(self, timeout_s: float = 30.0) -> float:
        """Wait until the store controllers hold no pending keys and no in-flight L2 tasks.

        Fails fast (with the log tail) if the sidecar dies meanwhile.
        """
        try:
            return self.admin.wait_store_drained(timeout_s)
        except (OSError, TimeoutError) as exc:
            if not self.alive():
                raise SidecarError(f"lmcache server died; log tail:\n{self.log_tail()}") from exc
            raise

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise SidecarError("sidecar not started")
        return self._proc


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The child leads its own session (start_new_session), so its pgid is its pid. Only called
    # while the leader is unreaped, so the id cannot have been reused by an unrelated process.
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@atexit.register
def _kill_leftovers() -> None:
    """Last line of defence: no sidecar or vLLM worker outlives the interpreter that started it."""
    for proc in list(LIVE_GROUPS):
        if proc.poll() is None:
            _kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        LIVE_GROUPS.discard(proc)
