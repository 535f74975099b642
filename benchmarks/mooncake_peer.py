"""A local Mooncake Store (master + one standalone client holding the memory) for the benchmarks.

    from mooncake_peer import MooncakePeer, unavailable
    if (why := unavailable()) is None:
        with MooncakePeer.start(capacity_bytes=4 << 30) as peer:
            env = {**os.environ, **peer.env}
            subprocess.run(["lmcache", "bench", "l2", "--l2-adapter", json.dumps(peer.adapter), ...], env=env)

Mooncake is the peer our benchmarks compare with: LMCache's ``mooncake_store`` L2 adapter (the
native ``lmcache.lmcache_mooncake`` connector) in the LMCache process, talking over TCP to a
``mooncake_master`` (object metadata, with its HTTP metadata server in place of etcd) and to a
``mooncake_client`` process that mounts ``capacity_bytes`` of DRAM as its global segment. So the
values live in another process, as they do with memkv nodes. ``benchmarks/mooncake_setup.sh``
installs the pieces; ``unavailable()`` says what is missing.

The master's RPC and the client's service port bind 127.0.0.1. Mooncake's own transfer engine
listens on the wildcard address for its data and handshake ports (it has no option to bind
them elsewhere), and the master's HTTP metadata and metrics servers also bind 0.0.0.0 even
when given a host: a benchmark host should not be on an untrusted network.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

SETUP_HINT = "run benchmarks/mooncake_setup.sh"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# The adapter's native worker threads (LMCache's default is 4; store and load each use one
# batch call per submit, so more workers help only with several submits in flight).
ADAPTER_WORKERS = 4


def _site_dir(package: str) -> Path | None:
    """The directory of a top-level package in this interpreter's environment, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _paths() -> tuple[Path, Path, Path] | str:
    """(mooncake package dir, libcudart dir, lmcache package dir), or why they are not there."""
    mooncake = _site_dir("mooncake")
    if mooncake is None or not (mooncake / "mooncake_master").exists() or not (mooncake / "mooncake_client").exists():
        return f"mooncake_master/mooncake_client not installed for {sys.executable}: {SETUP_HINT}"
    cudart = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    if not (cudart / "libcudart.so.12").exists():
        return f"libcudart.so.12 (nvidia-cuda-runtime-cu12) missing, Mooncake's binaries link it: {SETUP_HINT}"
    lmcache = _site_dir("lmcache")
    if lmcache is None:
        return f"lmcache is not installed for {sys.executable}"
    if not any(lmcache.glob("lmcache_mooncake*.so")):
        return f"LMCache's native lmcache.lmcache_mooncake module is not built (its wheel lacks it): {SETUP_HINT}"
    return mooncake, cudart, lmcache


def unavailable() -> str | None:
    """None when Mooncake can be started here, else a one-line reason."""
    found = _paths()
    return found if isinstance(found, str) else None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on the wildcard address (Mooncake binds some servers there),
    all held until every one is picked, so two picks cannot return the same port."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _tcp_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _http_answers(url: str) -> bool:
    """True once the HTTP metadata server answers at all (an unknown key is a 404: still an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _until_exited(pid: int, timeout: float) -> None:
    """Wait until ``pid`` (our child) has exited, without reaping it, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class MooncakePeer:
    """mooncake_master + one mooncake_client on loopback; stop() (or leaving the ``with``) ends both."""

    adapter: dict[str, object]
    env: dict[str, str]
    pids: dict[str, int]

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self._logdir = logdir
        self._own_logdir = True
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._child_env = env
        self.adapter = {}
        self.env = {}
        self.pids = {}

    @classmethod
    def start(cls, capacity_bytes: int) -> MooncakePeer:
        """Start master and client holding ``capacity_bytes``; raises RuntimeError (leaving nothing running)."""
        found = _paths()
        if isinstance(found, str):
            raise RuntimeError(f"Mooncake is not available: {found}")
        mooncake, cudart, _ = found
        if capacity_bytes < 1 << 20:
            raise RuntimeError(f"capacity_bytes={capacity_bytes}: give the Mooncake client at least 1 MiB")
        lib_path = os.pathsep.join(p for p in (str(cudart), os.environ.get("LD_LIBRARY_PATH", "")) if p)
        child_env = {**os.environ, "LD_LIBRARY_PATH": lib_path}
        peer = cls(Path(tempfile.mkdtemp(prefix="mooncake-peer-")), child_env)
        try:
            peer._launch(mooncake, capacity_bytes)
        except BaseException:
            peer.stop(keep_logs=True)  # the error names the logs
            raise
        # The adapter process needs libcudart only if its lmcache_mooncake was built without the
        # setup script's rpath; Mooncake's INFO lines would drown the benchmark's output.
        peer.env = {"LD_LIBRARY_PATH": lib_path, "MC_LOG_LEVEL": "WARNING"}
        return peer

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self._logdir / f"{name}.log", "wb")  # the child keeps its own copy of the fd
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._child_env, cwd=self._logdir, start_new_session=True,
            )
        finally:
            log.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid
        return proc

    def _wait(self, name: str, ready: Callable[[], bool], what: str, deadline: float) -> None:
        proc = self._procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode} before {what}; last log lines "
                    f"({self._logdir / (name + '.log')}):\n{_tail(self._logdir / (name + '.log'))}"
                )
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{name} not ready ({what}) within {START_TIMEOUT_S:.0f}s; last log lines:\n"
            f"{_tail(self._logdir / (name + '.log'))}"
        )

    def _launch(self, mooncake: Path, capacity_bytes: int) -> None:
        rpc_port, http_port, metrics_port, client_port = _free_ports(4)
        metadata = f"http://127.0.0.1:{http_port}/metadata"
        deadline = time.monotonic() + START_TIMEOUT_S
        self._spawn("mooncake_master", [
            str(mooncake / "mooncake_master"),
            "--rpc_address=127.0.0.1", f"--rpc_port={rpc_port}",
            "--enable_http_metadata_server=true",
            "--http_metadata_server_host=127.0.0.1", f"--http_metadata_server_port={http_port}",
            f"--metrics_port={metrics_port}", "--enable_metric_reporting=false",
            "--logtostderr",
        ])
        self._wait(
            "mooncake_master",
            lambda: _tcp_open(rpc_port) and _http_answers(f"{metadata}?key=memkv-bench-probe"),
            "RPC and HTTP metadata ports answering", deadline,
        )
        # mooncake_client mounts its segment with the master before it opens its service port,
        # so an open port means the capacity is in the pool.
        self._spawn("mooncake_client", [
            str(mooncake / "mooncake_client"),
            "--host=127.0.0.1", f"--port={client_port}",
            f"--global_segment_size={capacity_bytes}",
            f"--master_server_address=127.0.0.1:{rpc_port}",
            f"--metadata_server={metadata}",
            "--protocol=tcp",
            "--logtostderr",
        ])
        self._wait("mooncake_client", lambda: _tcp_open(client_port), "segment mounted, service port open", deadline)
        self.adapter = {
            "type": "mooncake_store",
            "local_hostname": "127.0.0.1",
            "metadata_server": metadata,
            "master_server_addr": f"127.0.0.1:{rpc_port}",
            "protocol": "tcp",
            # The LMCache side only reads and writes: it contributes no memory to the pool, and
            # needs no staging buffer (the connector registers LMCache's L1 buffers directly).
            "global_segment_size": "0",
            "local_buffer_size": "0",
            "num_workers": ADAPTER_WORKERS,
        }

    @property
    def logdir(self) -> Path:
        """Where the master's and client's logs are (removed by stop() unless kept)."""
        return self._logdir

    def stop(self, keep_logs: bool = False) -> None:
        """Kill both process groups and wait for them; safe to call more than once."""
        for name in ("mooncake_client", "mooncake_master"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                _until_exited(proc.pid, STOP_TIMEOUT_S)
                # The leader is not reaped yet, so its pid (the group id) cannot have been reused:
                # this reaches only what is left of its own group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not keep_logs and self._own_logdir:
            self._own_logdir = False
            for f in self._logdir.glob("*"):
                with contextlib.suppress(OSError):
                    f.unlink()
            with contextlib.suppress(OSError):
                self._logdir.rmdir()

    def __enter__(self) -> MooncakePeer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


if __name__ == "__main__":
    # Smoke run: python benchmarks/mooncake_peer.py [capacity_MiB] prints the adapter JSON and waits.
    import json

    reason = unavailable()
    if reason is not None:
        raise SystemExit(reason)
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    with MooncakePeer.start(mib << 20) as peer:
        print(json.dumps(peer.adapter))
        print(json.dumps(peer.env))
        print(peer.pids, peer.logdir, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
