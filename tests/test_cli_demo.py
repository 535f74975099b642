"""``memkv demo`` as a user runs it: a real subprocess that starts a real node and lmcache server.

Checks the JSON summary, the wall-clock bound, and that nothing it started outlives it
(child processes, its LMCache shared-memory segments), also when SIGINT stops it mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmcache_memkv.node.launcher import memkv_command, node_env

pytestmark = pytest.mark.slow

DEMO_BOUND_S = 90.0  # the product promise on a 2-core machine (it takes ~25 s here)


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc, no extra tools)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent and p not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _own_shm(pid: int) -> list[str]:
    return [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"lmcache_kv_{pid}_")]


def _watch(proc: subprocess.Popen[str], until: float) -> set[int]:
    """Sample the process tree until ``proc`` exits or ``until``; every descendant seen."""
    seen: set[int] = set()
    while proc.poll() is None and time.monotonic() < until:
        seen |= _children(proc.pid)
        time.sleep(0.3)
    return seen


def _stop_everything(proc: subprocess.Popen[str], seen: set[int]) -> None:
    """Test-failure path: whatever is left of this test's processes goes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in _alive(seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_demo_passes_within_bound_with_chunks_from_memkv_and_leaves_nothing_behind() -> None:
    started = time.monotonic()
    proc = subprocess.Popen(
        [*memkv_command(), "demo", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node_env()
    )
    seen: set[int] = set()
    try:
        seen = _watch(proc, started + DEMO_BOUND_S + 30)
        out, err = proc.communicate(timeout=5)
        wall = time.monotonic() - started
        assert proc.returncode == 0, err[-3000:]
        doc = json.loads(out)
        assert doc["ok"] is True, doc["message"]
        assert wall < DEMO_BOUND_S, f"demo took {wall:.0f}s"
        # 16 requests x 1024 tokens = 64 chunks of 512 KiB through an 8 MiB L1.
        assert doc["chunks_attempted"] == doc["chunks_stored"] == 64
        assert doc["chunks_spilled_to_memkv"] == doc["adapter_keys_stored"] == doc["node_keys"] == 64
        assert doc["chunks_requested"] == 32
        assert doc["chunks_fetched_from_memkv"] > 0
        assert doc["node_reads"] >= doc["chunks_fetched_from_memkv"]
        assert doc["byte_checks_passed"] == doc["chunks_requested"]
        assert doc["byte_checks_failed"] == doc["misses"] == 0
        assert doc["store_mib_s"] > 0 and doc["retrieve_mib_s"] > 0
        assert doc["node"]["data"].startswith("127.0.0.1:") and doc["node"]["control"].startswith("127.0.0.1:")
        assert doc["sidecar"]["rpc"].startswith("tcp://127.0.0.1:")
        assert doc["log_dir"] is None  # removed after a pass without --keep-logs
        assert len(seen) >= 2, "the demo should have run a node and a server"
        assert not _alive(seen), f"left running: {_alive(seen)}"
        assert not _own_shm(proc.pid)
    finally:
        _stop_everything(proc, seen)


def test_demo_stops_promptly_and_cleanly_on_sigint_mid_run(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*memkv_command(), "demo", "--json", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_env(),
    )
    seen: set[int] = set()
    try:
        # The client log appears once the node and server are up and the client connects:
        # from then on the workload is running.
        deadline = time.monotonic() + 90
        while not (tmp_path / "client.log").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the demo never got to its workload"
            seen |= _children(proc.pid)
            time.sleep(0.2)
        time.sleep(2.0)  # into the stores
        seen |= _children(proc.pid)
        assert len(seen) >= 2
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = proc.communicate(timeout=45)
        took = time.monotonic() - interrupted
        assert proc.returncode == 130, err[-3000:]
        assert took < 30, f"SIGINT took {took:.0f}s to stop the demo"
        assert json.loads(out)["message"] == "interrupted"
        assert "Traceback" not in err
        assert not _alive(seen), f"left running: {_alive(seen)}"
        assert not _own_shm(proc.pid)
    finally:
        _stop_everything(proc, seen)


def test_demo_help_says_what_it_does_and_shows_an_example() -> None:
    out = subprocess.run(
        [*memkv_command(), "demo", "--help"], capture_output=True, text=True, env=node_env(), timeout=30
    )
    assert out.returncode == 0
    assert "Run MemKV end to end on this machine" in out.stdout
    assert "Example: memkv demo" in out.stdout
    for option in ("--requests", "--tokens", "--node-capacity", "--keep-logs", "--log-dir", "--json"):
        assert option in out.stdout


def test_demo_rejects_a_workload_the_node_cannot_hold() -> None:
    out = subprocess.run(
        [*memkv_command(), "demo", "--node-capacity", "8MiB"],
        capture_output=True,
        text=True,
        env=node_env(),
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--node-capacity" in out.stderr
